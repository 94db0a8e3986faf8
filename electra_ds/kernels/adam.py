"""Triton fused ElectraAdam step, in place (twin: reference.adam_step)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


# Blocking: one flat elementwise pass, 1024 values per program (8 per thread with 4 warps, so each fp32 stream
# moves in 128-bit vectors): the step is bound by memory traffic (4 loads, 3 stores a value), and ELECTRA's
# millions of weights still give thousands of programs. Hyperparameters are plain fp32 scalar arguments, so a
# new lr each step reuses the compiled kernel; HAS_SCALE drops the grad_scale load when there is none.
@triton.jit
def _electra_adam_step(P, G, M, V, Scale, n, lr, one_minus_beta1, beta2, one_minus_beta2, eps, decay,
                       HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(V + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        g = g * tl.load(Scale).to(tl.float32)
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    p = p * decay - lr * tl.div_rn(m, tl.sqrt_rn(v) + eps)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(V + offs, v, mask=mask)


def _check(param, grad, exp_avg, exp_avg_sq, grad_scale) -> None:
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, t in named.items():
        if t.numel() != param.numel():
            raise ValueError(f"adam_step: {name} has {t.numel()} elements, param has {param.numel()}")
        if not t.is_contiguous():
            raise ValueError(f"adam_step: {name} must be contiguous")
        if t.device != param.device:
            raise ValueError(f"adam_step: {name} is on {t.device}, param on {param.device}")
    for name in ("exp_avg", "exp_avg_sq"):
        if named[name].dtype != torch.float32:
            raise ValueError(f"adam_step: {name} must be float32, got {named[name].dtype}")
    if grad_scale is not None and (grad_scale.numel() != 1 or grad_scale.device != param.device):
        raise ValueError(f"adam_step: grad_scale must be a one-value tensor on {param.device}, got "
                         f"{tuple(grad_scale.shape)} on {grad_scale.device}")


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_scale: torch.Tensor | None = None) -> None:
    """Triton in-place ElectraAdam step on param, exp_avg, exp_avg_sq; see reference.adam_step."""
    _check(param, grad, exp_avg, exp_avg_sq, grad_scale)
    n = param.numel()
    if n:
        _electra_adam_step[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, grad if grad_scale is None else grad_scale, n, float(lr),
            1.0 - beta1, float(beta2), 1.0 - beta2, float(eps), 1.0 - lr * weight_decay,
            HAS_SCALE=grad_scale is not None, BLOCK=_BLOCK, num_warps=4)
