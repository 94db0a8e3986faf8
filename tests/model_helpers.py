"""Helpers shared by the model and kernel tests (test_model.py, test_kernels.py, test_kernel_adam.py): the kernel
tests' devices and seeded tensors, tiny dropout-free models, token batches and their masking plans, one pretraining
forward and backward, and Gumbel sample counts against softmax.

Importing this module sets no environment variable and imports no triton (electra_ds.kernels imports it at a
kernel's first use): conftest.py sets TRITON_INTERPRET without CUDA, before anything imports triton."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from electra_ds import kernels
from electra_ds.config import ElectraConfig, preset
from electra_ds.data.masking import MaskingPlan, mask_tokens
from electra_ds.model import ElectraForPretraining, PretrainOutput

PAD, CLS, SEP, MASK = 0, 2, 3, 4
SPECIAL = (PAD, CLS, SEP, MASK)


# -- kernel tests: devices and tensors --------------------------------------------------------------------------
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def kernel_devices() -> list:
    """The devices a kernel test runs on: "cpu" under the Triton interpreter (skipped unless TRITON_INTERPRET=1,
    read now: call this after setting it) and "cuda" compiled (marked `gpu`, skipped without CUDA)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return [pytest.param("cpu", marks=pytest.mark.skipif(not interpret, reason="CPU kernels need TRITON_INTERPRET=1")),
            pytest.param("cuda", marks=GPU)]


def randn(shape, seed: int = 0, dtype: torch.dtype = torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Standard normal values times `scale`, drawn on the CPU from a generator seeded with `seed` (so every device
    gets the same values), then moved to `device` and cast to `dtype`."""
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(device=device, dtype=dtype)


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """kernels.set_backend(name) for the body, "auto" again after it."""
    kernels.set_backend(name)
    try:
        yield
    finally:
        kernels.set_backend("auto")


# -- tiny models, batches and steps ------------------------------------------------------------------------------
def no_dropout(name: str, **kw) -> ElectraConfig:
    return preset(name, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def perturbed(config: ElectraConfig, scale: float = 0.1, training: bool = False) -> ElectraForPretraining:
    """A model of `config` built after torch.manual_seed(0), in eval mode (train mode if `training`), each weight
    then moved by N(0, scale**2) noise: non-trivial LayerNorm and bias values, so a mix-up of weights shows and
    per-token losses differ."""
    torch.manual_seed(0)
    model = ElectraForPretraining(config).train(training)
    with torch.no_grad():
        for w in model.flat.values():
            w.add_(torch.randn_like(w) * scale)
    return model


def make_batch(vocab: int, batch: int = 3, length: int = 24, pad_from: dict | None = None, seed: int = 0):
    """ids (random in [5, vocab), [CLS] first, [SEP] last) and an attention mask; row r of `pad_from` ends with
    [SEP] at pad_from[r] - 1 and is padding from pad_from[r] on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    for row, start in (pad_from or {}).items():
        ids[row, start - 1], ids[row, start:], mask[row, start:] = SEP, PAD, 0
    return ids, mask


def mask_plan(ids: torch.Tensor, mask: torch.Tensor | None, **kw) -> MaskingPlan:
    """mask_tokens with this vocabulary's [MASK] and special ids; `kw` are its other arguments."""
    return mask_tokens(ids, mask, mask_token_id=MASK, special_ids=SPECIAL, **kw)


def forward_backward(model: ElectraForPretraining, ids: torch.Tensor, mask: torch.Tensor, plan: MaskingPlan,
                     seed: int, autocast: bool = False) -> PretrainOutput:
    """Gradients set to None, then one pretraining forward (Gumbel seed `seed`; under bf16 autocast on the ids'
    device if `autocast`) and the backward of its loss."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, mask, None, plan, torch.tensor(seed, device=ids.device))
    out.loss.backward()
    return out


def flat_grads(model: ElectraForPretraining) -> dict[str, torch.Tensor]:
    """The gradient of each flat buffer, by the buffer's name (model.views(flats=...) views it per weight)."""
    return {k: p.grad for k, p in model.flat.items()}


# -- sampling ----------------------------------------------------------------------------------------------------
def softmax_counts(samples: torch.Tensor, logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """How often each index of the 1-D `logits` occurs among the 1-D `samples`, and how often softmax(logits /
    temperature) expects it to, both float64 on the CPU."""
    p = torch.softmax(logits.double() / temperature, dim=0)
    counts = torch.bincount(samples.cpu(), minlength=p.numel()).double()
    return counts, p * samples.numel()
