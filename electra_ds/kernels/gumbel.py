"""Triton fp32 Gumbel-max sampling (twin: reference.gumbel_sample, which computes the same noise bit for bit).

The seed is read from a device tensor inside the kernel: no host sync, and a CUDA graph replays with
whatever seed the tensor holds at replay time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import tile_warps

_MAX_BLOCK = 4096


@triton.jit
def _mix32(x):
    # lowbias32, as reference.mix32 (uint32 arithmetic wraps modulo 2**32)
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


# Blocking: one program per row, sweeping the vocabulary in chunks of up to 4096 columns; each lane keeps
# its best (value, column) and the row's first maximal column is picked at the end, as torch.argmax does.
@triton.jit
def _electra_gumbel_sample(Logits, Seed, Out, V, stride, inv_t, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    seed = tl.load(Seed)
    key = _mix32(seed.to(tl.uint32) ^ _mix32((seed >> 32).to(tl.uint32) ^ 0x9E3779B9))
    row_key = _mix32(key ^ _mix32(row.to(tl.uint32)))
    cols = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_col = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(Logits + row.to(tl.int64) * stride + c, mask=c < V, other=0.0).to(tl.float32)
        h = _mix32(row_key ^ _mix32(c.to(tl.uint32)))
        u = ((h >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08  # odd multiple of 2**-24, inside (0, 1)
        z = tl.where(c < V, x * inv_t + -tl.log(-tl.log(u)), float("-inf"))
        # a NaN beats every number (+inf too) and is never beaten, as in torch.argmax
        better = (best == best) & ((z != z) | (z > best))
        best_col = tl.where(better, c, best_col)
        best = tl.where(better, z, best)
    nan = best != best
    first_nan = tl.min(tl.where(nan, best_col, V), axis=0)
    top = tl.max(tl.where(nan, float("-inf"), best), axis=0)
    first_top = tl.min(tl.where(best == top, best_col, V), axis=0)
    tl.store(Out + row, tl.where(first_nan < V, first_nan, first_top).to(tl.int64))


def gumbel_sample(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> torch.Tensor:
    """Triton Gumbel-max sample per row of logits (..., V) -> (...) long; see reference.gumbel_sample."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n, v = flat.shape
    out = torch.empty(n, dtype=torch.long, device=flat.device)
    if n:
        block = min(_MAX_BLOCK, triton.next_power_of_2(v))
        # fp fusion off: x * inv_t + noise must round like the twin's separate multiply and add
        _electra_gumbel_sample[(n,)](flat, seed.to(device=flat.device, dtype=torch.int64), out, v, flat.stride(0),
                                     1.0 / temperature, BLOCK=block, num_warps=tile_warps(block),
                                     enable_fp_fusion=False)
    return out.reshape(logits.shape[:-1])
