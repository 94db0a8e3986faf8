"""ELECTRA's optimizer: Adam without bias correction, with decoupled weight decay.

google-research/electra `AdamWeightDecayOptimizer` (model/optimization.py) updates each parameter as

    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g^2
    p = p - lr * (m / (sqrt(v) + eps) + weight_decay * p)

with no bias correction of m and v, and weight decay added to the update (so scaled by lr), not to the
gradient. Our model keeps its weights in about two flat tensors, and `kernels.adam_step` updates a tensor in
one fused pass (Triton on a GPU), so the whole step is a few kernels.

`max_grad_norm` clips by the global gradient norm inside the step, on the device: the norm and the clipping
coefficient min(1, max_grad_norm / (norm + 1e-6)) stay tensors, so the step never waits for the GPU.
DeepSpeed's own clipping reads the norm back to the host (a synchronisation per step), so
`engine.initialize` hands the clipping to this optimizer wherever DeepSpeed runs it unwrapped.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from electra_ds import kernels


class ElectraAdam(torch.optim.Optimizer):
    """Adam without bias correction and with decoupled weight decay (AdamWeightDecayOptimizer)."""

    def __init__(self, params: Iterable[Any], lr: float = 5e-4, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, max_grad_norm: float = 0.0) -> None:
        if lr < 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if max_grad_norm < 0.0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {max_grad_norm}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self.grad_norm: torch.Tensor | None = None  # the last step's global gradient norm (clipping only)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = self._clip_coefficient() if self.max_grad_norm else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ElectraAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                kernels.adam_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"],
                                  beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
                                  weight_decay=group["weight_decay"], grad_scale=scale)
        return loss

    def _clip_coefficient(self) -> torch.Tensor | None:
        """min(1, max_grad_norm / (norm + 1e-6)) as a device tensor; the norm is kept in `self.grad_norm`."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        self.grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
        return (self.max_grad_norm / (self.grad_norm + 1e-6)).clamp(max=1.0)


__all__ = ["ElectraAdam"]
