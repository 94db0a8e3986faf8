"""Fused ElectraAdam step (kernels.adam_step): the Triton kernel against its twin (the twin against the
optimizer's formula is tests/test_pretrain.py's ElectraAdam test). CPU tensors run under the Triton
interpreter; the `gpu` variants run compiled."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from electra_ds import kernels  # noqa: E402
from electra_ds.kernels import adam, reference  # noqa: E402
from model_helpers import GPU, kernel_devices, randn  # noqa: E402

DEVICES = kernel_devices()
HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6)
LRS = (1e-3, 5e-4, 2e-3)  # a new lr each step
# Both sides compute in fp32 (states agree to fp32 rounding); param is rounded once to its dtype, which can move
# a half-precision value by one unit in the last place (bf16 2**-7, fp16 2**-9 relative at worst). The
# interpreter truncates fp32 -> bf16 where compiled kernels round to nearest even, so there a bf16 param drifts
# up to one more unit toward zero each step.
STATE_TOL = dict(atol=1e-6, rtol=1e-5)
PARAM_TOL = {torch.float32: STATE_TOL, torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
             torch.float16: dict(atol=1e-4, rtol=2e-3)}
INTERPRETED_BF16_TOL = dict(atol=1e-3, rtol=(len(LRS) + 1) * 2**-7)


def _states(shape, param_dtype, device):
    """param, exp_avg, exp_avg_sq as after some training: v >= 0, a few exact zeros in m and v."""
    m, v = randn(shape, 2, device=device, scale=0.1), randn(shape, 3, device=device, scale=0.01).square()
    m.view(-1)[::7], v.view(-1)[::7] = 0.0, 0.0
    return randn(shape, 1, param_dtype, device), m, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (10, 100), (4099,)])  # one block is 1024 values
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_kernel_matches_twin(triton_backend, device, param_dtype, grad_dtype, shape, scaled, weight_decay):
    p, m, v = _states(shape, param_dtype, device)
    tp, tm, tv = p.clone(), m.clone(), v.clone()
    scale = torch.tensor(0.37, device=device) if scaled else None
    for step, lr in enumerate(LRS):
        grad = randn(shape, 10 + step, grad_dtype, device, scale=3.0)
        kernels.adam_step(p, grad, m, v, lr=lr, weight_decay=weight_decay, grad_scale=scale, **HYPER)
        reference.adam_step(tp, grad, tm, tv, lr=lr, weight_decay=weight_decay, grad_scale=scale, **HYPER)
        assert p.dtype == param_dtype and p.shape == shape
        interpreted_bf16 = device == "cpu" and param_dtype == torch.bfloat16
        torch.testing.assert_close(p, tp, **(INTERPRETED_BF16_TOL if interpreted_bf16 else PARAM_TOL[param_dtype]))
        torch.testing.assert_close(m, tm, **STATE_TOL)
        torch.testing.assert_close(v, tv, **STATE_TOL)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_elements(triton_backend, device):
    p, m, v = (torch.empty(0, device=device) for _ in range(3))
    kernels.adam_step(p, p.clone(), m, v, lr=1e-3, weight_decay=0.01, **HYPER)


def test_argument_errors():
    p, g, m, v = (torch.zeros(4, 3) for _ in range(4))
    step = lambda *a, **kw: adam.adam_step(*a, lr=1e-3, weight_decay=0.0, **HYPER, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="grad has 10 elements, param has 12"):
        step(p, torch.zeros(10), m, v)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        step(p, g, m, torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match="exp_avg must be float32"):
        step(p, g, m.bfloat16(), v)
    with pytest.raises(ValueError, match="grad is on meta, param on cpu"):
        step(p, g.to("meta"), m, v)
    with pytest.raises(ValueError, match="grad_scale must be a one-value tensor on cpu"):
        step(p, g, m, v, grad_scale=torch.ones(2))
    with pytest.raises(ValueError, match="grad_scale must be a one-value tensor on cpu"):
        step(p, g, m, v, grad_scale=torch.ones((), device="meta"))


def test_torch_backend_runs_the_twin(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "adam_step", lambda *a, **kw: calls.append(sorted(kw)))
    p = torch.zeros(3)
    for backend in ("auto", "torch"):  # auto: CPU tensors take the twin
        kernels.set_backend(backend)
        kernels.adam_step(p, p, p, p, lr=1e-3, weight_decay=0.0, **HYPER)
    kernels.set_backend("auto")
    assert calls == [["beta1", "beta2", "eps", "grad_scale", "lr", "weight_decay"]] * 2


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=GPU)])
def test_new_lr_reuses_compiled_kernel(triton_backend, device):
    p, m, v = _states((5000,), torch.bfloat16, device)
    g = randn((5000,), 4, torch.bfloat16, device)
    kernels.adam_step(p, g, m, v, lr=1e-3, weight_decay=0.01, **HYPER)
    caches = getattr(adam._electra_adam_step, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version keeps no device_caches")
    compiled = sum(len(c[0]) for c in caches.values())
    for lr in (2e-3, 0.0, 1.0, 3.3e-4):
        kernels.adam_step(p, g, m, v, lr=lr, weight_decay=0.01, **HYPER)
    assert sum(len(c[0]) for c in caches.values()) == compiled
