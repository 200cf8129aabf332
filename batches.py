"""
The training batches of one stage, on the device: the loader of the stage's data kind (an
ImageFolder, labelled shards, or image-caption shards), then the device side of the recipe
(uint8 -> [0,1], random erasing, label smoothing, MixUp / CutMix) and the loss's targets.
Each batch's randomness is a function of (seed, step, rank, micro step), so a resumed run
draws what an uninterrupted one would have.
"""
import torch
import torch.distributed as dist

import augment
import data as datalib
import decode
import webdata


class TrainBatches:
    """batches(step, micro_step) -> (images, targets for the loss, labels for the accuracy, unreadable
    images skipped). Labelled data: soft targets (or FARE's, from `fare`); web data: what
    `caption_targets(batch)` makes of the captions (their embeddings, or tokens for a trained
    text tower), with in-batch retrieval's labels 0..B-1. `samples_seen` and `state` (a checkpoint's
    data_state) place the stream where the run left it."""

    def __init__(self, cfg, train_data, micro, rank, world, device, samples_seen=0, state=None, caption_targets=None,
                 fare=None):
        self.cfg, self.rank, self.device, self.fare = cfg, rank, device, fare
        self.caption_targets = caption_targets
        self.web, self.shards = cfg['data'] == 'webdataset', cfg['data'] == 'shards'
        aug = dict(scale=tuple(cfg['crop_scale']), hflip=0.5 * cfg['hflip'], auto_augment=cfg['auto_augment'],
                   interpolation=cfg['train_interpolation'])
        if self.web or self.shards:  # a resumable stream: its state goes into the checkpoint
            self.loader = webdata.web_loader(train_data, cfg['img_size'], micro, rank, world, cfg['seed'],
                                             cfg['num_workers'], state=state, shuffle_buffer=cfg['shuffle_buffer'],
                                             labelled=self.shards, uint8=True,
                                             pin_memory=torch.device(device).type == 'cuda', **aug)
        else:  # an ImageFolder: the position in its seeded stream is the samples seen
            tf = decode.train_transform(cfg['img_size'], tuple(cfg['crop_scale']), cfg['hflip'], cfg['auto_augment'],
                                        cfg['train_interpolation'])
            self.loader = datalib.image_folder_loader(train_data, tf, micro, rank, world, cfg['seed'],
                                                      start=samples_seen // world, num_workers=cfg['num_workers'])
        self.it = iter(self.loader)

    def __call__(self, step, micro_step):
        if self.web:
            b = next(self.it)
            x = augment.to_device(b.image, self.device)
            return x, self.caption_targets(b), torch.arange(len(x), device=self.device), self.skipped()
        if self.shards:
            b = next(self.it)
            x, y, n_bad = b.image, b.label, self.skipped()
        else:
            x, y, n_bad = next(self.it)
        x, y = augment.to_device(x, self.device), augment.to_device(y, self.device)
        c = self.cfg
        s = (c['seed'] * 1_000_003 + step * 1009 + self.rank) * 64 + micro_step
        x = augment.random_erase(x, c['reprob'], seed=s)
        targets = augment.soft_targets(y, c['num_classes'], c['label_smoothing'])
        x, targets = augment.mix_batch(x, targets, c['mixup'], c['cutmix'], seed=s)
        if self.fare is not None:  # FARE's target: the original tower's embedding of the clean image
            targets = self.fare.targets(x)
        return x, targets, y, n_bad

    def skipped(self):
        return sum(self.loader.skipped_last.values())

    def state(self, world):
        """Every rank's stream position, merged (a collective under DDP); None for an ImageFolder,
        whose position is the samples seen."""
        if not (self.web or self.shards):
            return None
        states = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(states, self.loader.state_dict())
        else:
            states[0] = self.loader.state_dict()
        return webdata.merge_states(states)
