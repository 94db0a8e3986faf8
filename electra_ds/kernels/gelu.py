"""Triton bias + exact-erf GELU, forward and backward (twin: reference.bias_gelu)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import row_partition

_TILE = 4096  # values per program tile: BLOCK_M rows x BLOCK_F columns


# Blocking: 2-D tiles of up to 128 columns x (4096 / columns) rows, so the bias slice is loaded once per
# tile. The backward program walks a run of row tiles for one column tile and keeps the bias-gradient
# column sums in fp32 registers; one partial row per program is then summed by torch.
@triton.jit
def _electra_bias_gelu_fwd(X, B, Y, N, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < N)[:, None] & (cols < F)[None, :]
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _electra_bias_gelu_bwd(X, B, DY, DX, DB, N, F, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    b = tl.load(B + cols, mask=cols < F, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_F], dtype=tl.float32)
    start = pid * rows_per_program
    for m in range(start, tl.minimum(start + rows_per_program, N), BLOCK_M):
        rows = m + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & (cols < F)[None, :]
        offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        dz = dy * (cdf + z * pdf)
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(tl.where(mask, dz, 0.0), axis=0)
    tl.store(DB + pid * F + cols, db, mask=cols < F)


def _blocks(f: int) -> tuple[int, int]:
    block_f = min(128, triton.next_power_of_2(f))
    return _TILE // block_f, block_f


class BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        f = x.shape[-1]
        x2 = x.reshape(-1, f).contiguous()
        bias = bias.contiguous()
        n = x2.shape[0]
        y = torch.empty_like(x2)
        block_m, block_f = _blocks(f)
        if n:
            grid = (triton.cdiv(n, block_m), triton.cdiv(f, block_f))
            _electra_bias_gelu_fwd[grid](x2, bias, y, n, f, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4)
        ctx.save_for_backward(x2, bias)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        n, f = x2.shape
        dy2 = dy.reshape(-1, f).contiguous()
        dx = torch.empty_like(x2)
        block_m, block_f = _blocks(f)
        rows_per_program, groups = row_partition(n, block_m, x2.device)
        db = torch.zeros(groups, f, dtype=torch.float32, device=x2.device)
        if n:
            _electra_bias_gelu_bwd[(groups, triton.cdiv(f, block_f))](
                x2, bias, dy2, dx, db, n, f, rows_per_program, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4)
        return dx.view(dy.shape), db.sum(0).to(bias.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Triton exact-erf GELU of x + bias; see reference.bias_gelu."""
    return BiasGelu.apply(x, bias)
