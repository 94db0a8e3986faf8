"""Fused ops used by the model: a Triton kernel per op, and a plain-PyTorch twin (reference.py) that is its
specification. Under torch.compile the ops trace as their twins, which inductor fuses into its own kernels,
except `gumbel_sample`, which stays an opaque custom op (see there).

Backend choice: "auto" (default) runs Triton for CUDA tensors when triton imports and the twin otherwise;
"triton" forces the kernels (CPU tensors then need TRITON_INTERPRET=1 set before the first kernel call);
"torch" forces the twins. Set it with set_backend() or the ELECTRA_DS_KERNELS environment variable.
triton is imported only when a kernel is first used, so machines without it run the twins.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import reference

BACKENDS = ("auto", "triton", "torch")


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a kernel backend; use one of {', '.join(BACKENDS)}")
    return name


_backend = _checked(os.environ.get("ELECTRA_DS_KERNELS", "auto"), "ELECTRA_DS_KERNELS")


def set_backend(name: str) -> None:
    """Choose "auto", "triton" or "torch" for every op from now on."""
    global _backend
    _backend = _checked(name, "set_backend")


def get_backend() -> str:
    return _backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")  # imports, not only installed
    except ImportError:
        return False
    return True


def _use_triton(t: torch.Tensor) -> bool:
    if _backend == "torch" or torch.compiler.is_compiling():  # inductor fuses the twins itself
        return False
    if _backend == "auto":
        return t.is_cuda and triton_available()
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was asked for (set_backend / ELECTRA_DS_KERNELS) but triton "
                           "does not import: pip install triton, or use 'auto' or 'torch'")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernel backend 'triton' got a {t.device.type} tensor: Triton runs CPU tensors only "
                           "under TRITON_INTERPRET=1 (set before the first kernel call); or use 'auto'")
    return True


def _op(module: str) -> ModuleType:
    # Kernel modules are named apart from the ops (xentropy, not cross_entropy): importing a submodule sets
    # it as an attribute of this package, which would shadow the function of the same name.
    return importlib.import_module(f"{__name__}.{module}")


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dimension (residual may be None), fp32 statistics."""
    impl = _op("layer_norm") if _use_triton(x) else reference
    return impl.add_layer_norm(x, residual, weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias."""
    impl = _op("gelu") if _use_triton(x) else reference
    return impl.bias_gelu(x, bias)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in fp32: logits (N, V), targets (N,) -> (N,); target -100 gives 0."""
    impl = _op("xentropy") if _use_triton(logits) else reference
    return impl.cross_entropy(logits, targets)


def sigmoid_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-element binary cross-entropy with logits, in fp32."""
    impl = _op("bce") if _use_triton(logits) else reference
    return impl.sigmoid_bce(logits, labels)


def gumbel_sample(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> torch.Tensor:
    """Gumbel-max sample per row of logits (N, V) -> (N,) long, in fp32 with no gradient; the noise depends
    only on (seed, row, col) and seed is a 0-d int64 device tensor (no host sync).

    Under torch.compile it stays one opaque op (the Triton kernel on CUDA): the twin's hash is 64-bit integer
    arithmetic over every vocabulary logit, which the kernel does in native 32-bit (same bits either way)."""
    if torch.compiler.is_compiling():
        return _gumbel_sample_op(logits, seed, temperature)
    impl = _op("gumbel") if _use_triton(logits) else reference
    return impl.gumbel_sample(logits, seed, temperature)


@torch.library.custom_op("electra_ds::gumbel_sample", mutates_args=())
def _gumbel_sample_op(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> torch.Tensor:
    return gumbel_sample(logits, seed, temperature)


@_gumbel_sample_op.register_fake
def _(logits: torch.Tensor, seed: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits.new_empty(logits.shape[:-1], dtype=torch.long)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_scale: torch.Tensor | None = None) -> None:
    """One in-place ElectraAdam step in fp32 (no bias correction, decoupled weight decay): updates param (any
    float dtype), exp_avg and exp_avg_sq (fp32), all contiguous with param's numel. grad is multiplied by
    grad_scale, a 0-d fp32 tensor on param's device read there (no host sync), or by 1 when None."""
    impl = _op("adam") if _use_triton(param) else reference
    impl.adam_step(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay, grad_scale=grad_scale)


__all__ = ["BACKENDS", "adam_step", "add_layer_norm", "bias_gelu", "cross_entropy", "get_backend",
           "gumbel_sample", "reference", "set_backend", "sigmoid_bce", "triton_available"]
