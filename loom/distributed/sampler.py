"""A distributed sampler over data-parallel ranks: seeded shuffle, `set_epoch`, drop_last and padding rules.

Only the data-parallel rank picks the samples: the cp and tp ranks of one dp rank pass the same (dp_size, dp_rank)
and so receive the same batch. Ordering follows torch.utils.data.DistributedSampler (same permutation for the same
seed and epoch), which is what users of the reference Trainer get.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler


class DistributedSampler(Sampler[int]):
    """Indices of the samples for data-parallel rank `rank` of `num_replicas`.

    shuffle: a permutation seeded by `seed + epoch` (call `set_epoch` each epoch). drop_last: drop the tail that does
    not split evenly; otherwise the index list is padded by repeating from its start so every rank gets as many.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas - 1}], got {rank}")
        self.dataset, self.num_replicas, self.rank = dataset, num_replicas, rank
        self.shuffle, self.seed, self.drop_last, self.epoch, self.skip = shuffle, seed, drop_last, 0, 0
        n = len(dataset)
        self.num_samples = n // num_replicas if drop_last else math.ceil(n / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's permutation; `skip` drops this rank's first indices (resuming inside an epoch)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            indices = indices[:self.total_size]
        elif self.total_size > n:
            pad = self.total_size - n
            indices += (indices * math.ceil(pad / max(n, 1)))[:pad]
        return iter(indices[self.rank:self.total_size:self.num_replicas][self.skip:])
