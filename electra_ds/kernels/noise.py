"""reference.hash_uniform's counter-based noise as Triton device functions, shared by the kernels that draw it
(xentropy.py's Gumbel sampler, the dropout of layer_norm.py and hashed_dropout.py). uint32 arithmetic wraps modulo
2**32 here, as the twin's int32 arithmetic does."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mix32(x):
    # lowbias32, as reference.mix32
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def seed_key(Seed):
    """The key of the 0-d int64 seed that Seed points to."""
    seed = tl.load(Seed)
    return mix32(seed.to(tl.uint32) ^ mix32((seed >> 32).to(tl.uint32) ^ 0x9E3779B9))


# The kernels that read a dropout seed take its pointer unspecialised on alignment: a tower's site seeds are one vector
# (model.layers.dropout_sites), so a seed sits at any 8-byte offset, and Triton would compile each kernel twice.
UNALIGNED_SEED = {"do_not_specialize_on_alignment": ["Seed"]}


@triton.jit
def dropout_key(Seed):
    """The dropout masks' key: the low 32 bits of the 0-d int64 seed that Seed points to (reference.keyed_uniform)."""
    return tl.load(Seed).to(tl.uint32)


@triton.jit
def row_key(key, row):
    return mix32(key ^ mix32(row.to(tl.uint32)))


@triton.jit
def uniform(row_key, col):
    """fp32 noise in (0, 1): an odd multiple of 2**-24."""
    h = mix32(row_key ^ mix32(col.to(tl.uint32)))
    return ((h >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def keep(key, rows, cols, p):
    """reference.dropout_keep's mask of a (rows, cols) tile under the key (dropout_key)."""
    return uniform(row_key(key, rows)[:, None], cols[None, :]) >= p
