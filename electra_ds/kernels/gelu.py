"""Triton bias + exact-erf GELU, forward and backward (twin: reference.bias_gelu). `kernels.bias_gelu` calls these
passes through a custom op (opaque to torch.compile where it is asked to be)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import gelu_backward_launch

_FORWARD_TILE, _FORWARD_COLUMNS = 4096, 128  # the forward's program tile: values, and columns of each row


# Blocking: 2-D tiles of up to 128 columns (the backward's: launch.GELU_BACKWARD) x as many rows as fill the tile, so
# the bias slice is loaded once per tile. The backward program walks a run of row tiles for one column tile
# (software-pipelined over launch.GELU_BACKWARD's stages) and keeps the bias-gradient column sums in fp32 registers;
# one partial row per program is then summed by torch.
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
def _electra_bias_gelu_bwd(X, B, DY, DX, DB, N, F, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                           STAGES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    b = tl.load(B + cols, mask=cols < F, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_F], dtype=tl.float32)
    start = pid * rows_per_program
    for m in tl.range(start, tl.minimum(start + rows_per_program, N), BLOCK_M, num_stages=STAGES):
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


def forward_pass(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias) in x's dtype and shape."""
    f = x.shape[-1]
    x2 = x.reshape(-1, f).contiguous()
    n = x2.shape[0]
    y = torch.empty_like(x2)
    block_f = min(_FORWARD_COLUMNS, triton.next_power_of_2(f))
    block_m = _FORWARD_TILE // block_f
    if n:
        _electra_bias_gelu_fwd[(triton.cdiv(n, block_m), triton.cdiv(f, block_f))](
            x2, bias.contiguous(), y, n, f, BLOCK_M=block_m, BLOCK_F=block_f, num_warps=4)
    return y.view(x.shape)


def backward_pass(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x's gradient in x's dtype, the bias gradient's partials (`launch.gelu_partials_shape`, fp32): summed over
    dim 0 they are the bias's gradient)."""
    f = x.shape[-1]
    x2 = x.reshape(-1, f).contiguous()
    n = x2.shape[0]
    dx = torch.empty_like(x2)
    grid = gelu_backward_launch(x.shape, x.device)
    partials = (torch.empty if n else torch.zeros)(grid.programs, f, dtype=torch.float32, device=x.device)
    if n:
        _electra_bias_gelu_bwd[(grid.programs, triton.cdiv(f, grid.block_cols))](
            x2, bias.contiguous(), dy.reshape(-1, f).contiguous(), dx, partials, n, f, grid.rows_per_program,
            BLOCK_M=grid.block_m, BLOCK_F=grid.block_cols, STAGES=grid.num_stages, num_warps=grid.num_warps)
    return dx.view(x.shape), partials
