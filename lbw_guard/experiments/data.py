"""Token streams and the fixed batch schedule that every arm of a sweep shares.

Every arm sees the same batches in the same order for a given seed: the schedule is drawn
once from a seeded generator, independent of the global RNG the model or optimizer may use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The batch schedules seed torch with schedule_seed(seed), an int64: seeds stay below MAX_SEED.
MAX_SEED = 2**63 // 1_000_003 - 1


def schedule_seed(seed: int) -> int:
    return 1_000_003 * seed + 17


@dataclass
class TokenData:
    train: torch.Tensor  # int64 stream of the training split
    heldout: torch.Tensor  # int64 stream of the held-out split
    vocab_size: int
    seq_len: int

    def __post_init__(self) -> None:
        for name, stream in (("train", self.train), ("heldout", self.heldout)):
            if stream.numel() < self.seq_len + 2:
                raise ValueError(
                    f"{name} split has {stream.numel()} tokens, fewer than seq_len+2={self.seq_len + 2}"
                )

    def batch_schedule(self, steps: int, batch_size: int, seed: int) -> torch.Tensor:
        """[steps, batch_size] start offsets of training windows, a pure function of the seed."""
        gen = torch.Generator().manual_seed(schedule_seed(seed))
        high = self.train.numel() - self.seq_len - 1
        return torch.randint(0, high, (steps, batch_size), generator=gen)

    def batch(self, starts: torch.Tensor) -> torch.Tensor:
        """[len(starts), seq_len + 1] windows: inputs are [:, :-1], targets [:, 1:]."""
        offsets = torch.arange(self.seq_len + 1)
        return self.train[starts[:, None] + offsets[None, :]]

    def eval_windows(self, num_windows: int) -> torch.Tensor:
        """Up to ``num_windows`` non-overlapping held-out windows, spread over the whole split."""
        width = self.seq_len + 1
        available = self.heldout.numel() // width
        if available < 1:
            raise ValueError("held-out split is shorter than one window")
        n = min(num_windows, available)
        idx = torch.linspace(0, available - 1, n).round().long().unique()
        offsets = torch.arange(width)
        return self.heldout[idx[:, None] * width + offsets[None, :]]
