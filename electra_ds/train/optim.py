"""ELECTRA's optimizer: Adam without bias correction, with decoupled weight decay.

google-research/electra `AdamWeightDecayOptimizer` (model/optimization.py) updates each parameter as

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g^2
    p = p - lr * (m / (sqrt(v) + eps) + weight_decay * p)

with no bias correction of m and v, and weight decay added to the update (so scaled by lr), not to the
gradient. Our model keeps its weights in about two flat tensors, so a handful of `torch._foreach_*` calls per
group do the whole step.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class ElectraAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay (AdamWeightDecayOptimizer)."""

    def __init__(self, params: Iterable[Any], lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ElectraAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if params:
                _update(params, grads, exp_avgs, exp_avg_sqs, lr=group["lr"], beta1=group["betas"][0],
                        beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


def _update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
            exp_avg_sqs: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float) -> None:
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    if weight_decay:
        # p - lr * (m / d + wd * p) == p * (1 - lr * wd) - lr * m / d
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr)


__all__ = ["ElectraAdam"]
