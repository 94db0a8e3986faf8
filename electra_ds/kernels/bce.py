"""Triton sigmoid binary cross-entropy epilogue, forward and backward (twin: reference.sigmoid_bce)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


# Blocking: a flat elementwise sweep, 1024 values per program (8 per thread with 4 warps).
@triton.jit
def _electra_sigmoid_bce_fwd(X, Y, Loss, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0).to(tl.float32)
    # max(x, 0) - x*y + log1p(exp(-|x|)); log1p(e) = log(u) * e / (u - 1) with u = 1 + e (Goldberg).
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * e / tl.where(u == 1.0, 1.0, u - 1.0))
    tl.store(Loss + offs, tl.maximum(x, 0.0) - x * y + log1p, mask=mask)


@triton.jit
def _electra_sigmoid_bce_bwd(X, Y, DLoss, DX, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0).to(tl.float32)
    g = tl.load(DLoss + offs, mask=mask, other=0.0)
    tl.store(DX + offs, ((tl.sigmoid(x) - y) * g).to(DX.dtype.element_ty), mask=mask)


class SigmoidBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels):
        if labels.shape != logits.shape:
            raise ValueError(f"sigmoid_bce: labels {tuple(labels.shape)} must match logits {tuple(logits.shape)}")
        x = logits.contiguous()
        y = labels.detach().contiguous()
        if y.dtype == torch.bool:
            y = y.view(torch.uint8)
        loss = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        if x.numel():
            _electra_sigmoid_bce_fwd[(triton.cdiv(x.numel(), _BLOCK),)](
                x, y, loss, x.numel(), BLOCK=_BLOCK, num_warps=4)
        ctx.save_for_backward(x, y)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        x, y = ctx.saved_tensors
        dx = torch.empty_like(x)
        if x.numel():
            _electra_sigmoid_bce_bwd[(triton.cdiv(x.numel(), _BLOCK),)](
                x, y, dloss.float().contiguous(), dx, x.numel(), BLOCK=_BLOCK, num_warps=4)
        return dx, None


def sigmoid_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Triton per-element fp32 BCE-with-logits (no gradient for labels); see reference.sigmoid_bce."""
    return SigmoidBCE.apply(logits, labels)
