"""Triton per-row cross-entropy over full-vocabulary rows (twin: reference.cross_entropy).

The forward keeps only the fp32 log-sum-exp per row; the backward recomputes softmax from the logits and
writes the gradient straight in the logits dtype, so no (N, V) fp32 tensor is ever made.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import tile_warps
from .reference import IGNORE_INDEX

_MAX_BLOCK = 4096


# Blocking: one program per row, sweeping the vocabulary in chunks of up to 4096 columns with an online
# (per-lane running max and rescaled sum) log-sum-exp, so a 30522-wide row needs 8 chunks and no spills.
@triton.jit
def _electra_xentropy_fwd(Logits, Targets, Loss, Lse, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], -3.0e38, dtype=tl.float32)  # finite start: exp(m - m_new) stays defined
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    mx = tl.max(m, axis=0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), axis=0))
    target = tl.load(Targets + row)
    valid = target != IGNORE
    x_target = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - x_target, 0.0))
    tl.store(Lse + row, lse)


@triton.jit
def _electra_xentropy_bwd(Logits, Targets, Lse, DLoss, DLogits, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Targets + row)
    g = tl.where(target != IGNORE, tl.load(DLoss + row), 0.0)
    lse = tl.load(Lse + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(Logits + row * stride + c, mask=c < V, other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * g
        tl.store(DLogits + row * V + c, d.to(DLogits.dtype.element_ty), mask=c < V)


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"cross_entropy wants logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                             f"and {tuple(targets.shape)}")
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        targets = targets.contiguous()
        n, v = logits.shape
        block = min(_MAX_BLOCK, triton.next_power_of_2(v))
        loss = torch.empty(n, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(loss)
        if n:
            _electra_xentropy_fwd[(n,)](logits, targets, loss, lse, v, logits.stride(0), IGNORE=IGNORE_INDEX,
                                        BLOCK=block, num_warps=tile_warps(block))
        ctx.save_for_backward(logits, targets, lse)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        logits, targets, lse = ctx.saved_tensors
        n, v = logits.shape
        block = min(_MAX_BLOCK, triton.next_power_of_2(v))
        dlogits = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
        if n:
            _electra_xentropy_bwd[(n,)](logits, targets, lse, dloss.float().contiguous(), dlogits, v,
                                        logits.stride(0), IGNORE=IGNORE_INDEX, BLOCK=block,
                                        num_warps=tile_warps(block))
        return dlogits, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Triton per-row fp32 cross-entropy of logits (N, V) against targets (N,); see reference.cross_entropy."""
    return CrossEntropy.apply(logits, targets)
