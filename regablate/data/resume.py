"""The training sampler: one shuffled order for any number of devices, resumable part-way through an epoch.

A run restarted from a mid-epoch checkpoint (a Slurm time limit, a crash after a checkpoint at
``val_check_interval``) must see the batches that an uninterrupted run sees. Lightning restores
the loop's progress but restarts a plain sampler at the top of the epoch, so the resumed epoch
would repeat its first batches and skip its last ones (Lightning warns "your dataloader is not
resumable"). ``ResumableSampler`` is the ``DistributedSampler`` Lightning would insert, and when
the loader is built for a restored run it starts the epoch after the batches already trained on.
"""

from __future__ import annotations

import math
import os
import warnings

from lightning import Trainer
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` whose next epoch can start after its first ``skip`` samples (then whole epochs)."""

    skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


def train_sampler(dataset: Dataset, batch_size: int, trainer: Trainer | None) -> ResumableSampler:
    """The training sampler of ``dataset`` on this rank, seeded by ``PL_GLOBAL_SEED`` like Lightning's own.

    On one device it is the same permutation with one replica, so N devices see, step by step,
    the global batches that one device sees. Built for a run restored part-way through an epoch,
    it skips the batches that the restored loop has already processed.
    """
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    if trainer is not None:
        # a _ProcessedTracker at run time, typed as its base class
        done = getattr(trainer.fit_loop.epoch_loop.batch_progress.current, "processed", 0)
        if 0 < done < math.ceil(len(sampler) / batch_size):
            sampler.skip = done * batch_size
            # Lightning warns next that "your dataloader is not resumable": it looks for a stateful loader, not this.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    return sampler
