"""
Convert an ImageFolder tree (root/<class>/<image>, the ImageNet layout) into labelled
webdataset shards ({key}.jpg + {key}.cls, the usual ImageNet-21K layout) for data='shards':

$ python make_shards.py /data/imagenet/train /data/imagenet-shards/train            # max side 256
$ python make_shards.py /data/imagenet/train /data/in1k-320 --max_side 320 --workers 32

- The file list is shuffled once (seeded): an ImageFolder is sorted by class, and a loader's
  shuffle buffer of a few thousand samples cannot undo that.
- Each image is resized so that its longer side is at most --max_side (256 by default, as
  FFCV advises for low-resolution stages: a 112 px crop never needs more), anti-aliased
  bicubic, and re-encoded as JPEG; a JPEG that is already small enough is copied byte for byte.
- Resumable: a shard is written to a .tmp file and renamed when complete, with its counts in
  a .json beside it; a rerun skips the complete shards (after an interruption or a crash).
- Unreadable files are skipped, counted and listed (manifest.json and the run's last line).
- manifest.json: the classes in label order (label = index of the sorted class folder, as
  torchvision's ImageFolder numbers them), images per shard, unreadable files, the arguments,
  and the brace pattern to pass as --train_data.
"""
import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import time
from multiprocessing import Pool

from PIL import Image

from data import list_image_folder


def encode(path, max_side, quality):
    """JPEG bytes of the image at path, longer side <= max_side. Raises if unreadable."""
    with Image.open(path) as im:
        im.load()  # decode it all: a truncated file fails here, not in training
        if max(im.size) <= max_side and im.format == 'JPEG' and im.mode in ('RGB', 'L'):
            with open(path, 'rb') as f:
                return f.read()
        im = im.convert('RGB')
        if max(im.size) > max_side:
            scale = max_side / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC,
                           reducing_gap=3.0)
        buf = io.BytesIO()
        im.save(buf, format='JPEG', quality=quality)
        return buf.getvalue()


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tar.addfile(info, io.BytesIO(payload))


def write_shard(job):
    """Write one shard (tmp then rename) and its .json of counts; returns the counts."""
    name, items, args, plan = job
    tar_path = os.path.join(args.dst, name + '.tar')
    stats = {'name': name + '.tar', 'n': 0, 'unreadable': [], 'plan': plan}
    with tarfile.open(tar_path + '.tmp', 'w') as tar:
        for key, path, label in items:
            try:
                payload = encode(path, args.max_side, args.quality)
            except Exception as e:  # truncated, corrupt or not an image at all
                stats['unreadable'].append(f"{os.path.relpath(path, args.src)}: {type(e).__name__}")
                continue
            _add(tar, f'{key}.jpg', payload)
            _add(tar, f'{key}.cls', str(label).encode())
            stats['n'] += 1
    json.dump(stats, open(os.path.join(args.dst, name + '.json.tmp'), 'w'))
    os.replace(tar_path + '.tmp', tar_path)  # the .tar first: a shard counts as done only once both exist
    os.replace(os.path.join(args.dst, name + '.json.tmp'), os.path.join(args.dst, name + '.json'))
    return stats


def done_stats(dst, name, plan):
    """The counts of a complete shard of this conversion, or None."""
    try:
        stats = json.load(open(os.path.join(dst, name + '.json')))
    except (OSError, ValueError):
        return None
    if stats.get('plan') != plan:
        raise SystemExit(f"{dst} holds shards of another conversion ({name}.json): use an empty folder")
    return stats if os.path.isfile(os.path.join(dst, name + '.tar')) else None


def convert(args):
    t0 = time.time()
    classes, samples = list_image_folder(args.src)
    if not samples:
        raise SystemExit(f"no images found under {args.src} (expected {args.src}/<class>/<image>.jpg)")
    random.Random(args.seed).shuffle(samples)
    n_shards = (len(samples) + args.shard_size - 1) // args.shard_size
    width = max(6, len(str(n_shards - 1)))
    # what makes two runs' shards interchangeable: the file list, its order and the encoding
    h = hashlib.sha1(f'{args.shard_size} {args.max_side} {args.quality}'.encode())
    for p, y in samples:
        h.update(f'\n{os.path.relpath(p, args.src)} {y}'.encode())
    plan = h.hexdigest()[:16]
    os.makedirs(args.dst, exist_ok=True)
    jobs, stats = [], {}
    for i in range(n_shards):
        name = f'{args.prefix}-{i:0{width}d}'
        chunk = samples[i * args.shard_size:(i + 1) * args.shard_size]
        done = done_stats(args.dst, name, plan)
        if done is not None:
            stats[i] = done
        else:
            jobs.append((name, [(f'{i * args.shard_size + j:09d}', p, y) for j, (p, y) in enumerate(chunk)], args, plan))
    print(f"{len(samples)} images, {len(classes)} classes -> {n_shards} shards in {args.dst} "
          f"({n_shards - len(jobs)} already done)", flush=True)
    if jobs:
        with Pool(min(args.workers, len(jobs))) as pool:
            for k, s in enumerate(pool.imap_unordered(write_shard, jobs), 1):
                stats[int(s['name'][len(args.prefix) + 1:-4])] = s
                if k % max(1, len(jobs) // 20) == 0 or k == len(jobs):
                    print(f"  {k}/{len(jobs)} shards written ({time.time() - t0:.0f}s)", flush=True)
    shards = [stats[i] for i in range(n_shards)]
    unreadable = [u for s in shards for u in s['unreadable']]
    manifest = {
        'source': os.path.abspath(args.src), 'classes': classes, 'n_images': sum(s['n'] for s in shards),
        'n_unreadable': len(unreadable), 'unreadable': unreadable,
        'pattern': os.path.join(os.path.abspath(args.dst), f"{args.prefix}-{{{0:0{width}d}..{n_shards - 1:0{width}d}}}.tar"),
        'shards': [{'name': s['name'], 'n': s['n']} for s in shards],
        'max_side': args.max_side, 'quality': args.quality, 'shard_size': args.shard_size, 'seed': args.seed,
    }
    with open(os.path.join(args.dst, 'manifest.json.tmp'), 'w') as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(args.dst, 'manifest.json.tmp'), os.path.join(args.dst, 'manifest.json'))
    print(f"done: {manifest['n_images']} images in {n_shards} shards, {len(unreadable)} unreadable "
          f"({time.time() - t0:.0f}s); --train_data='{manifest['pattern']}'")
    return manifest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('src', help='ImageFolder root: src/<class>/<image>')
    ap.add_argument('dst', help='output folder (created; a rerun resumes)')
    ap.add_argument('--max_side', type=int, default=256, help='longer side at most this many pixels (default 256)')
    ap.add_argument('--shard_size', type=int, default=1000, help='images per shard')
    ap.add_argument('--quality', type=int, default=90, help='JPEG quality of re-encoded images')
    ap.add_argument('--seed', type=int, default=0, help='seed of the one-time shuffle')
    ap.add_argument('--prefix', default='shard', help='shard names: PREFIX-000000.tar, ...')
    ap.add_argument('--workers', type=int, default=os.cpu_count() or 1, help='processes')
    args = ap.parse_args(argv)
    if not os.path.isdir(args.src):
        raise SystemExit(f"not a folder: {args.src}")
    return convert(args)


if __name__ == '__main__':
    sys.exit(0 if main() else 1)
