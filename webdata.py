"""
Webdataset shards, caption (.jpg + .txt) or labelled (.jpg + .cls, make_shards.py): a small tar
reader and an endless, exactly resumable, DDP-aware stream of batches (WebLoader). Images stay
in [0,1] (or uint8); normalisation happens inside the model. Layout and resume: see below.
"""
import gzip
import io
import json
import os
import sys
from collections import namedtuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from data import SigtermSafeLoader
from decode import RESAMPLE, load_train_image


# Image-text webdataset shards (img2dataset layout: {key}.jpg|png|webp, {key}.txt, optional
# {key}.json and {key}.cls) as an endless, resumable, DDP-aware stream for the web-scale
# contrastive stage; labelled shards ({key}.jpg + {key}.cls) through the same stream for
# supervised stages (WebLoader(labelled=True)).
#
# Why our own tar reading and not webdataset's pipeline: webdataset 1.0.2 has no resume, its
# resampled shard lists draw shards with replacement (duplicates within a pass), and its
# error handlers drop samples without telling anyone. Here each stream reads its shards
# itself, so a position is just (shard counter, samples read from that shard) and every
# skipped sample is counted. webdataset is still used for what it does well: pattern
# expansion (braces, '::', env vars) and opening local files, `pipe:` commands and URLs.
#
# Layout: global stream g = rank * num_workers + worker reads the shard sequence
# S[base + g + k*G], k = 0, 1, ..., where G = world_size * num_workers and S is the endless
# concatenation of per-pass permutations of the shard list (seeded by (seed, pass)). Within
# a pass every shard is read exactly once, by one stream; fewer shards than streams is fine.
#
# Resume is exact: a batch carries its stream's state (shard counter, samples read, the
# shuffle buffer as (shard counter, index) references, batch counter); all randomness of a
# batch (shuffle draws, crops, flips) is seeded by (seed, stream, batch counter); and the
# DataLoader's worker round-robin is rotated to restart at the stream that was due. So a
# resumed run yields the same batches, in the same order, as an uninterrupted one, given
# the same shards, seed, world size, num_workers, batch size and buffer size (resuming
# refills each buffer by re-reading its last few shards). With another layout the streams
# restart from the earliest open shard: up to G shards are read twice and the buffers'
# contents are lost (a one-line warning says so). Batches the loader had prefetched but the
# training loop had not consumed are produced again, as they should be.
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')
KEEP_EXTS = IMAGE_EXTS + ('txt', 'cls')
SKIP_KINDS = ('bad_samples', 'bad_shards')  # undecodable/incomplete samples; truncated/unreadable shards

WebBatch = namedtuple('WebBatch', 'image text key label')  # label: LongTensor, -1 where no .cls, or None


# -------------------------------------------------------------------- shards
def _local_path(url):
    """The file a url names, or None for pipes and remote urls (checked when opened)."""
    scheme = urlparse(url).scheme
    if scheme == 'file':
        return url2pathname(urlparse(url).path)
    return url if scheme == '' and url != '-' else None


def expand_shards(pattern):
    """'/data/laion/{00000..41407}.tar' (or '::'-joined patterns, or a list) -> list of
    urls. Local files are checked up front: a missing one is a one-line error."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [u for p in patterns for u in expand_urls(p)]
    if not urls:
        raise SystemExit(f"no shards match '{pattern}'")
    missing = [u for u in urls if _local_path(u) is not None and not os.path.isfile(_local_path(u))]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(urls)} shards)" if len(missing) > 1 else ''
        raise SystemExit(f"missing shard: {missing[0]}{more}")
    return urls


_ZERO_BLOCK = bytes(512)


def _read_exact(f, n):
    data = f.read(n)
    if len(data) < n:
        raise EOFError(f"truncated tar member ({len(data)} of {n} bytes)")
    return data


def _skip(f, n):  # read, not seek: a truncated shard must still fail here
    while n:
        n -= len(_read_exact(f, min(n, 1 << 20)))


def tar_members(f):
    """(name, read) for each regular file of an uncompressed tar stream (ustar, GNU or pax
    format); read() returns the member's bytes, and a member not read is skipped. tarfile
    parses every field of every header in Python; this reads only the fields a shard needs,
    and still checks every header's checksum."""
    long_name = None
    while True:
        h = f.read(512)
        if not h or h == _ZERO_BLOCK:  # end of archive (tarfile also accepts a stream without one)
            return
        if len(h) < 512:
            raise EOFError("truncated tar header")
        stored = int(h[148:156].split(b'\0', 1)[0].strip() or b'0', 8)
        unsigned = sum(h) - sum(h[148:156]) + 256
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in h[:148] + h[156:]):
            raise ValueError("bad tar header checksum (a damaged shard, or not an uncompressed tar)")
        if h[124] & 0x80:  # base-256 size (members over 8 GiB)
            size = int.from_bytes(h[125:136], 'big')
        else:
            size = int(h[124:136].split(b'\0', 1)[0].strip() or b'0', 8)
        kind, pad = h[156:157], -size % 512
        if kind in (b'L', b'x'):  # GNU long name / pax extended header: they name the next member
            meta = _read_exact(f, size)
            _skip(f, pad)
            if kind == b'L':
                long_name = meta.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
            else:  # records "<len> key=value\n"; a pax size would override the header's (only > 8 GiB)
                for rec in meta.split(b'\n'):
                    if b' path=' in rec:
                        long_name = rec.split(b'=', 1)[1].decode('utf-8', 'surrogateescape')
            continue
        name = long_name or h[:100].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')
        if long_name is None and h[257:263] == b'ustar\0' and h[345] != 0:  # POSIX ustar name prefix
            name = h[345:500].split(b'\0', 1)[0].decode('utf-8', 'surrogateescape') + '/' + name
        long_name = None
        if kind not in (b'0', b'\0', b'7'):  # directories, links, global pax headers: no file data to use
            _skip(f, size + pad)
            continue
        done = []

        def read():
            done.append(True)
            return _read_exact(f, size)
        yield name, read
        _skip(f, pad if done else size + pad)


def _open_tar(url):
    """A shard's byte stream; .tar.gz / .tgz shards (or a gzip stream under any name, where
    the stream can peek) are decompressed on the fly."""
    stream = gopen(url, 'rb')
    magic = stream.peek(2)[:2] if hasattr(stream, 'peek') else b''
    if magic == b'\x1f\x8b' or url.endswith(('.gz', '.tgz')):
        return gzip.GzipFile(fileobj=stream, mode='rb'), stream
    return stream, stream


def iter_tar_samples(url, skip=0, wanted=None, keep=KEEP_EXTS):
    """(index, sample) for the samples of one shard, a sample being {'__key__', ext: bytes}
    of consecutive members sharing a key (webdataset's grouping). Samples with index < skip,
    or not in `wanted`, are counted but their bytes not read. A truncated or unreadable
    shard raises (EOFError, ValueError, OSError, ...) after the last complete sample; the
    sample being read when it broke is never yielded."""
    last = max(wanted) if wanted else None
    f, stream = _open_tar(url)
    try:
        cur, idx = None, -1
        use = lambda i: i >= skip and (wanted is None or i in wanted)
        for name, read in tar_members(f):
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            if cur is None or key != cur['__key__']:
                if cur is not None and use(idx):
                    yield idx, cur
                if last is not None and idx >= last:
                    return
                idx, cur = idx + 1, {'__key__': key}
            ext = ext.lower()
            if ext in keep and use(idx):
                cur[ext] = read()
        if cur is not None and use(idx):
            yield idx, cur
    finally:
        try:
            stream.close()
        except Exception:  # a pipe closed early may report a non-zero status
            pass


# -------------------------------------------------------------------- decoding
def decode_sample(s, img_size, rng, train=True, labelled=False, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                  auto_augment='', interpolation='bilinear'):
    """Raw sample -> (uint8 (3, S, S) tensor, caption, key, label). Train: load_train_image
    (random resized crop, open_clip's default scale (0.9, 1), flip, optional RandAugment) seeded
    from rng; eval: resize the short side and centre-crop. Caption shards need a .txt, labelled
    shards (.jpg + .cls, the ImageNet-21K layout) a .cls. Raises on anything undecodable."""
    data = next((s[e] for e in IMAGE_EXTS if e in s), None)
    if data is None or ('cls' if labelled else 'txt') not in s:
        raise ValueError(f"sample has no image or no {'label' if labelled else 'caption'}")
    text = s['txt'].decode('utf-8', errors='replace') if 'txt' in s else ''
    label = int(s['cls'].decode().strip()) if 'cls' in s else -1
    if train:
        img = load_train_image(data, int(rng.integers(2 ** 63)), img_size, scale, ratio, hflip, auto_augment,
                               interpolation)
        return img, text, s['__key__'], label
    im = Image.open(io.BytesIO(data))
    im.draft('RGB', (img_size, img_size))  # JPEG: decode at a reduced scale (DCT-domain, fast) no smaller than S x S
    im = im.convert('RGB')
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    im = im.resize((img_size, img_size), RESAMPLE[interpolation], box=box)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()), text, s['__key__'], label


# -------------------------------------------------------------------- streams
def shard_index(pos, n_shards, seed):
    """Shard at position pos of the endless sequence: pass pos // n, permuted per pass."""
    p, i = divmod(pos, n_shards)
    return int(np.random.default_rng([seed, p]).permutation(n_shards)[i])


def new_stream_state():
    return {'k': 0, 'n': 0, 'b': 0, 'buf': [], 'skipped': dict.fromkeys(SKIP_KINDS, 0)}


class _Reader:
    """Reads the stream's shards in order; (k, n) = shard counter and samples read from it."""

    def __init__(self, ds, g, st):
        self.ds, self.g, self.k, self.n, self.skipped = ds, g, st['k'], st['n'], st['skipped']
        self.it = None

    def url(self, k):
        ds = self.ds
        return ds.urls[shard_index(ds.base + self.g + k * ds.G, len(ds.urls), ds.seed)]

    def next(self):
        while True:
            if self.it is None:
                self.it = iter_tar_samples(self.url(self.k), skip=self.n)
            try:
                j, s = next(self.it)
                self.n = j + 1
                return (self.k, j), s
            except StopIteration:
                pass
            except Exception as e:
                self.skipped['bad_shards'] += 1
                print(f"webdata: skipping the rest of {self.url(self.k)}: {type(e).__name__}: {e}", file=sys.stderr)
            self.it, self.k, self.n = None, self.k + 1, 0

    def refill(self, refs):
        """Re-read the samples a checkpointed shuffle buffer held (a few recent shards)."""
        got = {}
        for k in sorted({k for k, _ in refs}):
            want = {j for kk, j in refs if kk == k}
            try:
                for j, s in iter_tar_samples(self.url(k), skip=min(want), wanted=want):
                    got[(k, j)] = s
            except Exception:
                pass
        lost = sum((k, j) not in got for k, j in refs)
        self.skipped['bad_samples'] += lost
        return [((k, j), got[(k, j)]) for k, j in refs if (k, j) in got]


class WebStream(IterableDataset):
    """Each (rank, worker) yields whole batches from its own stream: (uint8 or float
    images, captions, keys, labels, meta) with meta = {'stream', 'state'}."""

    def __init__(self, urls, img_size, batch_size, rank, world_size, num_workers, seed, shuffle_buffer,
                 streams, base, first_worker, train, uint8, decode_kw):
        super().__init__()
        self.urls, self.img_size, self.batch_size = urls, img_size, batch_size
        self.rank, self.W = rank, max(1, num_workers)
        self.G = world_size * self.W
        self.seed, self.buffer, self.streams, self.base = seed, max(1, shuffle_buffer), streams, base
        self.first_worker, self.train, self.uint8, self.decode_kw = first_worker, train, uint8, decode_kw

    def __iter__(self):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        g = self.rank * self.W + (wid + self.first_worker) % self.W  # rotation: resume where the round-robin stopped
        st = self.streams.get(g) or new_stream_state()
        st = {**st, 'skipped': dict(st['skipped'])}
        reader = _Reader(self, g, st)
        buf = reader.refill([tuple(r) for r in st['buf']])
        b = st['b']
        while True:
            rng = np.random.default_rng([self.seed, g, b])  # a batch's randomness depends on (seed, stream, batch) only
            imgs, texts, keys, labels = [], [], [], []
            while len(imgs) < self.batch_size:
                while len(buf) < self.buffer:
                    buf.append(reader.next())
                j = int(rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                _, s = buf.pop()
                try:
                    img, text, key, label = decode_sample(s, self.img_size, rng, self.train, **self.decode_kw)
                except Exception:
                    reader.skipped['bad_samples'] += 1
                    continue
                imgs.append(img), texts.append(text), keys.append(key), labels.append(label)
            b += 1
            # numpy, not torch: tiny torch ops on a busy CPU wait on the intra-op thread pool (100x slower)
            x = np.stack([i.numpy() for i in imgs])
            x = torch.from_numpy(x if self.uint8 else x.astype(np.float32) / np.float32(255))
            state = {'k': reader.k, 'n': reader.n, 'b': b, 'buf': [list(r) for r, _ in buf],
                     'skipped': dict(reader.skipped)}
            # the state as one string: the DataLoader would otherwise walk (default_convert) and pickle
            # the buffer's references element by element, for every batch
            yield x, texts, keys, torch.tensor(labels), {'stream': g, 'state': json.dumps(state)}


class WebLoader:
    """Endless batches WebBatch(image (B,3,S,S) in [0,1], or uint8 with uint8=True, text
    list[str], key list[str], label LongTensor or None) for this rank. labelled=True reads
    labelled shards (.cls required, no caption needed: text is ''); otherwise a caption is
    required. decode_kw: decode_sample's (scale, ratio, hflip, auto_augment, interpolation).
    Counts exactly what it yields (`samples`, `batches`) and what it skipped (`skipped`: totals
    over this rank's streams; `skipped_last`: in the latest batch), and `state_dict()` restores
    the stream exactly (see the module docstring). Iterating again continues from the current state."""

    def __init__(self, pattern, img_size, batch_size, rank=0, world_size=1, seed=0, num_workers=2,
                 shuffle_buffer=1000, state=None, train=True, uint8=False, pin_memory=False, **decode_kw):
        self.urls = expand_shards(pattern)
        self.img_size, self.batch_size, self.rank, self.world_size = img_size, batch_size, rank, world_size
        self.seed, self.num_workers, self.shuffle_buffer = seed, num_workers, shuffle_buffer
        self.train, self.uint8, self.pin_memory, self.decode_kw = train, uint8, pin_memory, decode_kw
        self.streams, self.base, self.batches, self.samples = {}, 0, 0, 0
        self.skipped_last = dict.fromkeys(SKIP_KINDS, 0)
        if state:
            self.load_state_dict(state)

    def layout(self):
        return {'n_shards': len(self.urls), 'world_size': self.world_size, 'num_workers': max(1, self.num_workers),
                'seed': self.seed, 'batch_size': self.batch_size, 'shuffle_buffer': self.shuffle_buffer}

    @property
    def skipped(self):
        return {k: sum(st['skipped'][k] for st in self.streams.values()) for k in SKIP_KINDS}

    def state_dict(self):
        # only this rank's own streams: after a resume self.streams also holds the other ranks'
        # (stale) states, which must not reach the checkpoint
        W = max(1, self.num_workers)
        own = {g: st for g, st in self.streams.items() if g // W == self.rank}
        return {'layout': self.layout(), 'base': self.base, 'streams': own,
                'ranks': {self.rank: {'batches': self.batches, 'samples': self.samples}}}

    def load_state_dict(self, state):
        r = state['ranks'].get(self.rank) or state['ranks'].get(str(self.rank)) or {'batches': 0, 'samples': 0}
        self.batches, self.samples = r['batches'], r['samples']
        streams = {int(g): st for g, st in state['streams'].items()}
        if state['layout'] == self.layout():
            self.base, self.streams = state['base'], streams
            return
        # another layout: restart every stream at the earliest shard any stream had open
        old = state['layout']
        G = old['world_size'] * old['num_workers']
        pos = [state['base'] + g + st['k'] * G for g, st in streams.items()]
        self.base, self.streams = (min(pos) if pos else 0), {}
        print(f"webdata: resuming with another layout ({old} -> {self.layout()}): restarting at shard position "
              f"{self.base}; up to {G} shards are read twice and the shuffle buffers are lost", file=sys.stderr)

    def __iter__(self):
        W = max(1, self.num_workers)
        ds = WebStream(self.urls, self.img_size, self.batch_size, self.rank, self.world_size, self.num_workers,
                       self.seed, self.shuffle_buffer, dict(self.streams), self.base, self.batches % W, self.train,
                       self.uint8, self.decode_kw)
        # its own generator: starting the DataLoader draws a seed, which must not come from torch's global
        # RNG (train.py seeds it per step, and a resumed run starts this iterator at another step)
        dl = SigtermSafeLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=False, generator=torch.Generator().manual_seed(self.seed))
        for x, texts, keys, labels, meta in dl:
            state = json.loads(meta['state'])
            prev = self.streams.get(meta['stream'], new_stream_state())['skipped']
            self.skipped_last = {k: state['skipped'][k] - prev[k] for k in SKIP_KINDS}
            self.streams[meta['stream']] = state
            self.batches += 1
            self.samples += len(texts)
            yield WebBatch(x, texts, keys, labels if bool((labels >= 0).all()) else None)


def web_loader(pattern, img_size, batch_size, rank=0, world_size=1, seed=0, num_workers=2, state=None, **kw):
    """See WebLoader. Under DDP, checkpoint all ranks' states:
        states = [None] * world; dist.all_gather_object(states, loader.state_dict())
        ckpt['data'] = merge_states(states)     # every rank then resumes from ckpt['data']"""
    return WebLoader(pattern, img_size, batch_size, rank, world_size, seed, num_workers, state=state, **kw)


def merge_states(states):
    """One state from the per-rank state_dicts (streams are keyed by global stream id
    g = rank * num_workers + worker). Stream g's state comes from its owner, rank
    g // num_workers, whatever the order of `states` and whatever else a rank reported."""
    W = states[0]['layout']['num_workers']
    out = {'layout': states[0]['layout'], 'base': states[0]['base'], 'streams': {}, 'ranks': {}}
    for s in states:
        out['ranks'].update(s['ranks'])
        ranks = {int(r) for r in s['ranks']}
        for g, st in s['streams'].items():
            if int(g) // W in ranks or int(g) not in out['streams']:  # the owner's copy wins
                out['streams'][int(g)] = st
    return out
