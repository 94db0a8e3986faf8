"""Seeds derived from (seed, step, rank, stream), so every random draw of a run is reproducible and resumable."""
from __future__ import annotations

import random

import numpy as np
import torch

# Seed streams: masking, Gumbel sampling, dropout, evaluation data.
MASK_STREAM, SAMPLE_STREAM, DROPOUT_STREAM, EVAL_STREAM = 1, 2, 3, 4


def derive_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A well-mixed 62-bit seed from (seed, step, rank, stream) (splitmix64 rounds)."""
    mask = (1 << 64) - 1
    x = 0
    for part in (seed, stream, rank, step):
        x = (x ^ (part & mask)) + 0x9E3779B97F4A7C15 & mask
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & mask
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & mask
        x ^= x >> 31
    return x >> 2


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


__all__ = ["DROPOUT_STREAM", "EVAL_STREAM", "MASK_STREAM", "SAMPLE_STREAM", "derive_seed", "seed_everything"]
