"""Triton bias + dropout + residual add + LayerNorm, forward and backward (twin: reference.add_layer_norm).

Dropout draws its keep mask from the counter-based hash of (seed, row, column) that the twin computes bit for bit;
the backward draws it again from the same seed, so no mask is stored between the passes. `kernels.add_layer_norm`
calls these passes through a custom op (opaque to torch.compile)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import layer_norm_backward_launch, row_tile, tile_warps
from .noise import UNALIGNED_SEED, dropout_key, keep
from .reference import dropout_scale

# Blocking: a program tile holds BLOCK_M whole rows (the row padded to a power of two, hidden <= 8192) and
# as many rows as fit in about 2048 values, so mean and variance are in-register row reductions and small
# hidden sizes still give each program enough work. The backward program (its tile and count:
# launch.LAYER_NORM_BACKWARD) walks a contiguous run of row tiles (software-pipelined over its stages: the next
# tiles' loads in flight while one is computed) and keeps its column sums (the weight's, the bias's, x's bias's
# gradients) in fp32 registers; torch adds up the per-program partials.
@triton.jit(**UNALIGNED_SEED)
def _electra_add_layer_norm_fwd(X, XB, R, W, B, Y, Mean, Rstd, Seed, N, H, eps, p, scale,
                                HAS_XBIAS: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < N)[:, None] & (cols < H)[None, :]
    offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        x += tl.load(XB + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
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
def _electra_add_layer_norm_bwd(X, XB, R, W, DY, Mean, Rstd, Seed, DX, DR, Partials, N, H, rows_per_program, p,
                                scale, HAS_XBIAS: tl.constexpr, HAS_RES: tl.constexpr, DROPOUT: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    w = tl.load(W + cols, mask=cols < H, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        xb = tl.load(XB + cols, mask=cols < H, other=0.0).to(tl.float32)
        dxb = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    if DROPOUT:
        key = dropout_key(Seed)
    start = pid * rows_per_program
    for m in tl.range(start, tl.minimum(start + rows_per_program, N), BLOCK_M, num_stages=STAGES):
        rows = m + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & (cols < H)[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_XBIAS:
            x += xb[None, :]
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
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]  # the residual's gradient
        if HAS_RES:
            tl.store(DR + offs, dx.to(DR.dtype.element_ty), mask=mask)
        if DROPOUT:
            dx = tl.where(kept, dx * scale, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
        if HAS_XBIAS:
            dxb += dx
    if HAS_XBIAS:
        out = Partials + pid * 3 * H + cols
        tl.store(out + 2 * H, tl.sum(dxb, axis=0), mask=cols < H)
    else:
        out = Partials + pid * 2 * H + cols
    tl.store(out, tl.sum(dw, axis=0), mask=cols < H)
    tl.store(out + H, tl.sum(db, axis=0), mask=cols < H)


def forward_pass(x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor, eps: float, dropout: float,
                 seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(LayerNorm(dropout(x + x_bias) + residual) in x's dtype and shape, the backward's statistics (2, rows):
    each row's mean and 1 / standard deviation, fp32)."""
    if dropout > 0 and seed is None:
        raise ValueError("add_layer_norm dropout needs a seed (kernels.add_layer_norm draws one when given None)")
    h = x.shape[-1]
    block_m, block_h = row_tile(h, "add_layer_norm")
    x2 = x.reshape(-1, h).contiguous()
    n = x2.shape[0]
    y = torch.empty_like(x2)
    stats = torch.empty(2, n, dtype=torch.float32, device=x.device)
    if n:
        xb, r2, seed = _operands(x2, x_bias, residual, seed)
        _electra_add_layer_norm_fwd[(triton.cdiv(n, block_m),)](
            x2, xb, r2, weight.contiguous(), bias.contiguous(), y, *stats, seed, n, h, eps, dropout,
            dropout_scale(dropout), HAS_XBIAS=x_bias is not None, HAS_RES=residual is not None, DROPOUT=dropout > 0,
            BLOCK_M=block_m, BLOCK_H=block_h, num_warps=tile_warps(block_m * block_h))
    return y.view(x.shape), stats


def backward_pass(dy: torch.Tensor, x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None,
                  weight: torch.Tensor, stats: torch.Tensor, seed: torch.Tensor | None,
                  dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x's gradient in x's dtype, the residual's in its dtype (an empty tensor without one), the column-sum partials
    (`launch.layer_norm_partials_shape`, fp32): summed over dim 0 they are the gradients of weight, bias and x_bias)."""
    h = x.shape[-1]
    grid = layer_norm_backward_launch(x.shape, x.device)
    x2 = x.reshape(-1, h).contiguous()
    n = x2.shape[0]
    dx = torch.empty_like(x2)
    dres = torch.empty_like(x2, dtype=residual.dtype) if residual is not None else x2.new_empty(0)
    partials = (torch.empty if n else torch.zeros)(grid.programs, 2 + (x_bias is not None), h, dtype=torch.float32,
                                                   device=x.device)
    if n:
        xb, r2, seed = _operands(x2, x_bias, residual, seed)
        _electra_add_layer_norm_bwd[(grid.programs,)](
            x2, xb, r2, weight.contiguous(), dy.reshape(-1, h).contiguous(), *stats, seed, dx,
            dres if residual is not None else dx, partials, n, h, grid.rows_per_program, dropout,
            dropout_scale(dropout), HAS_XBIAS=x_bias is not None, HAS_RES=residual is not None, DROPOUT=dropout > 0,
            BLOCK_M=grid.block_m, BLOCK_H=grid.block_cols, STAGES=grid.num_stages, num_warps=grid.num_warps)
    return dx.view(x.shape), dres.view(x.shape) if residual is not None else dres, partials


def _operands(x2: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None,
              seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_bias, the residual (as x2's rows) and the seed as the kernels take them: contiguous, the seed on x2's device
    (kernels.add_layer_norm takes one on any device); x2 stands in for one that is None, a pointer the kernel reads
    only under its constexpr flag."""
    return (x2 if x_bias is None else x_bias.contiguous(),
            x2 if residual is None else residual.reshape(x2.shape).contiguous(),
            x2 if seed is None else seed.to(x2.device))
