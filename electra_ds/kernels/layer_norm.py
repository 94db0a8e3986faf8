"""Triton dropout + residual add + LayerNorm, forward and backward (twin: reference.add_layer_norm).

Dropout draws its keep mask from the counter-based hash of (seed, row, column) that the twin computes bit for bit;
the backward draws it again from the same seed, so no mask is stored between the passes."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import row_partition, row_tile, tile_warps
from .noise import UNALIGNED_SEED, dropout_key, keep
from .reference import dropout_scale

# Blocking: a program tile holds BLOCK_M whole rows (the row padded to a power of two, hidden <= 8192) and
# as many rows as fit in about 2048 values, so mean and variance are in-register row reductions and small
# hidden sizes still give each program enough work. The backward program walks a contiguous run of row
# tiles and keeps the weight/bias gradient sums in fp32 registers; torch adds up the per-program partials.
@triton.jit(**UNALIGNED_SEED)
def _electra_add_layer_norm_fwd(X, R, W, B, Y, Mean, Rstd, Seed, N, H, eps, p, scale,
                                HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        x = tl.where(keep(dropout_key(Seed), rows, cols, p), x * scale, 0.0)
    if HAS_RES:
        x += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / H + eps)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rows < N)
    tl.store(Rstd + rows, rstd, mask=rows < N)


@triton.jit(**UNALIGNED_SEED)
def _electra_add_layer_norm_bwd(X, R, W, DY, Mean, Rstd, Seed, DX, DR, DW, DB, N, H, rows_per_program, p, scale,
                                HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    if DROPOUT:
        key = dropout_key(Seed)
    start = pid * rows_per_program
    for m in range(start, tl.minimum(start + rows_per_program, N), BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & (cols < H)[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            kept = keep(key, rows, cols, p)
            x = tl.where(kept, x * scale, 0.0)
        if HAS_RES:
            x += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rows < N, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rows < N, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / H
        c2 = tl.sum(wdy, axis=1) / H
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if DROPOUT:  # dx is the residual's gradient; x's passes the dropout
            if HAS_RES:
                tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)
            dx = tl.where(kept, dx * scale, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * H + cols, tl.sum(dw, axis=0), mask=cols < H)
    tl.store(DB + pid * H + cols, tl.sum(db, axis=0), mask=cols < H)


class AddLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout, seed):
        h = x.shape[-1]
        block_m, block_h = row_tile(h, "add_layer_norm")
        x2 = x.reshape(-1, h).contiguous()
        r2 = x2 if residual is None else residual.reshape(-1, h).contiguous()
        seed = x2 if seed is None else seed.to(device=x2.device, dtype=torch.int64)  # x2: a pointer never read
        weight, bias = weight.contiguous(), bias.contiguous()
        n = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(n, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        ctx.has_res, ctx.dropout = residual is not None, dropout
        if n:
            _electra_add_layer_norm_fwd[(triton.cdiv(n, block_m),)](
                x2, r2, weight, bias, y, mean, rstd, seed, n, h, eps, dropout, dropout_scale(dropout),
                HAS_RES=ctx.has_res, DROPOUT=dropout > 0, BLOCK_M=block_m, BLOCK_H=block_h,
                num_warps=tile_warps(block_m * block_h))
        ctx.save_for_backward(x2, r2, weight, bias, mean, rstd, seed)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r2, weight, bias, mean, rstd, seed = ctx.saved_tensors
        n, h = x2.shape
        block_m, block_h = row_tile(h, "add_layer_norm")
        dy2 = dy.reshape(-1, h).contiguous()
        dropout = ctx.dropout > 0
        # The kernel rounds each gradient once to its buffer's dtype. Without dropout x's and the residual's gradients
        # are one value, computed in the wider dtype (bf16 x + fp32 residual under autocast), so the residual's is not
        # rounded to x's (as in the twin); with dropout they differ and each gets a buffer of its own input's dtype.
        dx = torch.empty_like(x2) if dropout else torch.empty_like(x2, dtype=torch.promote_types(x2.dtype, r2.dtype))
        dres = torch.empty_like(r2) if dropout and ctx.has_res else dx  # r2 is x2 without a residual
        rows_per_program, groups = row_partition(n, block_m, x2.device)
        dw = torch.zeros(groups, h, dtype=torch.float32, device=x2.device)
        db = torch.zeros_like(dw)
        if n:
            _electra_add_layer_norm_bwd[(groups,)](
                x2, r2, weight, dy2, mean, rstd, seed, dx, dres, dw, db, n, h, rows_per_program, ctx.dropout,
                dropout_scale(ctx.dropout), HAS_RES=ctx.has_res, DROPOUT=dropout, BLOCK_M=block_m, BLOCK_H=block_h,
                num_warps=tile_warps(block_m * block_h))
        dres = dres.view(dy.shape).to(r2.dtype) if ctx.has_res else None
        return (dx.view(dy.shape).to(x2.dtype), dres, dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype), None,
                None, None)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, dropout: float = 0.0, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Triton LayerNorm(dropout(x) + residual) over the last dimension; see reference.add_layer_norm."""
    return AddLayerNorm.apply(x, residual, weight, bias, float(eps), float(dropout), seed)
