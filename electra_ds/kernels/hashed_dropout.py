"""Triton dropout whose keep mask is the hash of (seed, row, column) (twin: reference.dropout).

The backward draws the same mask again from the seed: nothing is stored between the passes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import row_tile, tile_warps
from .noise import UNALIGNED_SEED, dropout_key, keep
from .reference import dropout_scale


# Blocking: as layer_norm.py's forward, BLOCK_M whole rows per program (about 2048 values), so each row's key is
# hashed once per program and each column's once per tile.
@triton.jit(**UNALIGNED_SEED)
def _electra_dropout(X, Y, Seed, N, H, p, scale, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.where(keep(dropout_key(Seed), rows, cols, p), x * scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


def _apply(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1]
    block_m, block_h = row_tile(h, "dropout")
    x2 = x.reshape(-1, h).contiguous()
    y = torch.empty_like(x2)
    if x2.numel():
        _electra_dropout[(triton.cdiv(x2.shape[0], block_m),)](
            x2, y, seed, x2.shape[0], h, p, dropout_scale(p), BLOCK_M=block_m, BLOCK_H=block_h,
            num_warps=tile_warps(block_m * block_h))
    return y.view(x.shape)


class HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, seed):
        seed = seed.to(device=x.device, dtype=torch.int64)
        ctx.p = p
        ctx.save_for_backward(seed)
        return _apply(x, p, seed)

    @staticmethod
    def backward(ctx, dy):
        (seed,) = ctx.saved_tensors
        return _apply(dy, ctx.p, seed), None, None


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """Triton dropout of x by the hash mask of seed; see reference.dropout."""
    return HashedDropout.apply(x, float(p), seed)
