"""Fused kernels (electra_ds/kernels): every Triton kernel against its plain-PyTorch twin, forward and backward.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, which
conftest.py sets); with CUDA the same comparisons run compiled on the GPU (marked `gpu`).
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

pytest.importorskip("triton")

from electra_ds import kernels  # noqa: E402
from electra_ds.config import preset  # noqa: E402
from electra_ds.kernels import reference  # noqa: E402
from model_helpers import forward_backward, flat_grads, kernel_backend, kernel_devices, make_batch, mask_plan, \
    perturbed, randn, softmax_counts  # noqa: E402

DEVICES = kernel_devices()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Both sides compute in fp32 and round once to the output dtype, so results differ by float32 rounding
# (reduction order, erf/exp/log implementations), which can move a half-precision result by one unit in
# the last place: rtol of two such units (bf16 2**-7, fp16 2**-9), atol for cancellation near zero.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-3, rtol=1.6e-2),
       torch.float16: dict(atol=1e-4, rtol=2e-3)}


def _make(shape, dtype, device, scale=1.0, seed=0, grad=True):
    return randn(shape, seed, dtype, device, scale).requires_grad_(grad)


def _run(fn, args, out_seed=123):
    """fn(*args) and the gradients of its tensor arguments that require grad, for a fixed output gradient."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    out.backward(_output_grad(out, out_seed))
    return out.detach(), [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _output_grad(out: torch.Tensor, seed: int = 123) -> torch.Tensor:
    """The output gradient `_run` feeds back for an output like `out`."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)


def _compare(fn, twin, args, tol):
    out, grads = _run(fn, args)
    ref_out, ref_grads = _run(twin, args)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **tol)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,residual", [((7, 64), True), ((3, 5, 256), True), ((4, 768), False),
                                            ((300, 100), True), ((2, 1000), False)])
def test_add_layer_norm(triton_backend, device, dtype, shape, residual):
    h = shape[-1]
    x = _make(shape, dtype, device, seed=1)
    r = _make(shape, dtype, device, seed=2) if residual else None
    w = _make((h,), dtype, device, seed=3) + 1.0
    b = _make((h,), dtype, device, seed=4)
    w = w.detach().requires_grad_()
    _compare(kernels.add_layer_norm, reference.add_layer_norm, (x, r, w, b, 1e-12), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_fp32_params_half_input(triton_backend, device):
    x, r = _make((6, 96), torch.bfloat16, device, seed=1), _make((6, 96), torch.bfloat16, device, seed=2)
    w, b = _make((96,), torch.float32, device, seed=3), _make((96,), torch.float32, device, seed=4)
    _compare(kernels.add_layer_norm, reference.add_layer_norm, (x, r, w, b, 1e-5), TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,res_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                               (torch.float32, torch.bfloat16)])
def test_add_layer_norm_mixed_residual_dtype(triton_backend, device, x_dtype, res_dtype):
    """Under autocast, layer 0 of a model without embeddings_project adds a half-precision x to the fp32 embedding
    output: each gradient is rounded once to its own input's dtype, so the residual's stays fp32 (not x's)."""
    x, r = _make((3, 5, 96), x_dtype, device, seed=1), _make((3, 5, 96), res_dtype, device, seed=2)
    w, b = _make((96,), torch.float32, device, seed=3) + 1.0, _make((96,), torch.float32, device, seed=4)
    args = (x, r, w.detach().requires_grad_(), b, 1e-12)
    out, grads = _run(kernels.add_layer_norm, args)
    ref_out, ref_grads = _run(reference.add_layer_norm, args)
    assert out.dtype == ref_out.dtype == x_dtype
    torch.testing.assert_close(out, ref_out, **TOL[x_dtype])
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [x_dtype, res_dtype, torch.float32,
                                                                        torch.float32]
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[g.dtype])


def _with_dropout(fn, dropout, seed):
    return lambda x, r, w, b, eps: fn(x, r, w, b, eps, dropout, seed)


def _dropout_kernel(dropout, seed):
    """The Triton op with this seed."""
    def kernel(*args, x_bias=None):
        with kernel_backend("triton"):
            return kernels.add_layer_norm(*args, dropout, seed, x_bias)
    return kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,residual,dropout", [((7, 64), True, 0.1), ((3, 5, 256), True, 0.0),
                                                    ((300, 100), False, 0.3), ((2, 768), True, 0.5)])
def test_add_layer_norm_x_bias(device, dtype, shape, residual, dropout):
    """A matrix product's bias added inside the kernel (before the dropout) and its gradient summed there: the twin's
    output and gradients, x_bias's included, in each input's dtype."""
    h = shape[-1]
    x = _make(shape, dtype, device, seed=1)
    r = _make(shape, dtype, device, seed=2) if residual else None
    w = (_make((h,), torch.float32, device, seed=3) + 1.0).detach().requires_grad_()
    b = _make((h,), torch.float32, device, seed=4)
    x_bias = _make((h,), dtype, device, seed=5)
    seed = torch.tensor(2**40 + 9, dtype=torch.int64, device=device)
    args = (x, r, w, b, 1e-12, x_bias)
    kernel = _dropout_kernel(dropout, seed)
    out, grads = _run(lambda x, r, w, b, eps, xb: kernel(x, r, w, b, eps, x_bias=xb), args)
    ref_out, ref_grads = _run(lambda x, r, w, b, eps, xb: reference.add_layer_norm(x, r, w, b, eps, dropout, seed, xb),
                              args)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] and grads[-1].dtype == dtype
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[dtype])
    if dtype == torch.float32:  # x_bias's gradient is x's summed over rows (before either is rounded)
        torch.testing.assert_close(grads[-1], grads[0].reshape(-1, h).sum(0), **TOL[dtype])


def _record_passes(monkeypatch, module: str, launches: list, prefix: str = "") -> None:
    """Append prefix + "forward_pass" / "backward_pass" to `launches` each time electra_ds.kernels.<module>'s pass runs
    (the opaque ops call them)."""
    kernel = importlib.import_module(f"electra_ds.kernels.{module}")
    for name in ("forward_pass", "backward_pass"):
        monkeypatch.setattr(kernel, name, lambda *a, _f=getattr(kernel, name), _n=prefix + name:
                            launches.append(_n) or _f(*a))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["opaque", "traced"])
def test_compiled_add_layer_norm(device, mode, monkeypatch):
    """Under torch.compile with the Triton backend: "opaque" runs the kernels as custom ops (the forward and the
    backward pass once each, for the LayerNorm with a residual; checked by opcheck), "traced" the twin in inductor's
    kernels; either way the output and gradients equal the eager twin's, dropout mask included. The LayerNorm without
    a residual (the embeddings') traces in both modes."""
    x, r = _make((4, 9, 96), torch.float32, device, seed=1), _make((4, 9, 96), torch.float32, device, seed=2)
    w, b = _make((96,), torch.float32, device, seed=3) + 1.0, _make((96,), torch.float32, device, seed=4)
    x_bias = _make((96,), torch.float32, device, seed=5)
    seed = torch.tensor(2**41 + 3, dtype=torch.int64, device=device)
    launches = []
    _record_passes(monkeypatch, "layer_norm", launches)

    def fn(x, r, w, b, x_bias):
        h = kernels.add_layer_norm(x, r, w, b, 1e-12, 0.2, seed, x_bias)
        return kernels.add_layer_norm(h, None, w, b, 1e-12)

    def twin(x, r, w, b, x_bias):
        return reference.add_layer_norm(reference.add_layer_norm(x, r, w, b, 1e-12, 0.2, seed, x_bias), None, w, b,
                                        1e-12)

    args = (x, r, w.detach().requires_grad_(), b, x_bias)
    try:
        kernels.set_compiled_layer_norm(mode)
        with kernel_backend("triton"):
            torch._dynamo.reset()
            out, grads = _run(torch.compile(fn, fullgraph=True, dynamic=False), args)
            assert launches == (["forward_pass", "backward_pass"] if mode == "opaque" else [])
            if mode == "opaque":
                torch.library.opcheck(torch.ops.electra_ds.add_layer_norm.default,
                                      (x.detach().clone().requires_grad_(), x_bias, r, w, b, seed, 1e-12, 0.2))
    finally:
        kernels.set_compiled_layer_norm("traced")
    ref_out, ref_grads = _run(twin, args)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["opaque", "traced"])
def test_compiled_bias_gelu(device, mode, monkeypatch):
    """Under torch.compile with the Triton backend: "opaque" runs the GELU kernels as custom ops (the forward and the
    backward pass once each; checked by opcheck), "traced" the twin in inductor's kernels; either way the output and
    both gradients equal the eager twin's."""
    x, bias = _make((4, 9, 160), torch.float32, device, scale=3.0, seed=1), _make((160,), torch.float32, device, seed=2)
    launches = []
    _record_passes(monkeypatch, "gelu", launches)
    try:
        kernels.set_compiled_gelu(mode)
        with kernel_backend("triton"):
            torch._dynamo.reset()
            out, grads = _run(torch.compile(kernels.bias_gelu, fullgraph=True, dynamic=False), (x, bias))
            assert launches == (["forward_pass", "backward_pass"] if mode == "opaque" else [])
            if mode == "opaque":
                torch.library.opcheck(torch.ops.electra_ds.bias_gelu.default, (x.detach().clone().requires_grad_(),
                                                                               bias.detach().clone()))
    finally:
        kernels.set_compiled_gelu("traced")
    ref_out, ref_grads = _run(reference.bias_gelu, (x, bias))
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    assert len(grads) == 2
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[torch.float32])


def _gelu_grads_bounded(out, grads, ref_out, ref_grads, dtype, out_tol):
    """The traced GELU's output equals the twin's within out_tol; its gradients differ by rounding of the stored
    slope (below 2**-15 times the output gradient, `_output_grad`) and, for the bias, of each summed term to the
    input's dtype: within one unit in the last place of dtype (2**-7 of a value for bf16, 2**-10 for fp16, fp32
    products' rounding for fp32) of each term and of the sum."""
    torch.testing.assert_close(out, ref_out, **out_tol)
    (dx, dbias), (ref_dx, ref_dbias) = grads, ref_grads
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 2.0 ** -20}[dtype]
    terms = ref_dx.float().reshape(-1, ref_dx.shape[-1])
    assert dx.dtype == ref_dx.dtype and dbias.dtype == ref_dbias.dtype
    slope_error = 2.0 ** -15 * _output_grad(out).float().abs()
    assert ((dx.float() - ref_dx.float()).abs() <= ulp * ref_dx.float().abs() + slope_error).all()
    bound = ulp * (terms.abs().sum(0) + ref_dbias.float().abs()) + 1e-6
    assert ((dbias.float() - ref_dbias.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_traced_gelu_stores_its_slope_finely(dtype):
    """The GELU form that torch.compile traces (kernels._TracedBiasGelu), run eagerly: it stores the GELU's slope
    for the backward (for half-precision inputs in int16, in units of 2**-14: within 2**-15 of the exact slope, over
    inputs that span its range) and no input, and its results are the twin's within rounding."""
    x = _make((4, 9, 160), dtype, "cpu", scale=3.0, seed=1)
    bias = _make((160,), dtype, "cpu", seed=2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, grads = _run(kernels._TracedBiasGelu.apply, (x, bias))
    ref_out, ref_grads = _run(reference.bias_gelu, (x, bias))
    _gelu_grads_bounded(out, grads, ref_out, ref_grads, dtype, dict(atol=0, rtol=0))  # the same ops forward
    (slope,) = saved
    z = x.detach().double() + bias.detach().double()
    exact = torch.special.ndtr(z) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    assert exact.min() < -0.12 and exact.max() > 1.12  # the slope's whole range
    if dtype == torch.float32:
        assert slope.dtype == torch.float32
        torch.testing.assert_close(slope.double(), exact, atol=1e-6, rtol=0)
    else:
        assert slope.dtype == torch.int16
        assert (slope.double() * 2.0 ** -14 - exact).abs().max() <= 2.0 ** -15 + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_traced_bias_gelu_in_half_precision(device, dtype):
    """The same through torch.compile with the Triton backend, which takes that form (inductor's code): the slope
    and the bias's gradient summed from the half-precision input gradient give the twin's results within rounding
    (whether the step keeps the int16 slope: test_inductor_census)."""
    x = _make((4, 9, 160), dtype, device, scale=3.0, seed=1)
    bias = _make((160,), dtype, device, seed=2)
    with kernel_backend("triton"):
        torch._dynamo.reset()
        out, grads = _run(torch.compile(kernels.bias_gelu, fullgraph=True, dynamic=False), (x, bias))
    ref_out, ref_grads = _run(reference.bias_gelu, (x, bias))
    _gelu_grads_bounded(out, grads, ref_out, ref_grads, dtype, TOL[dtype])  # inductor's erf is not ATen's


@pytest.mark.parametrize("op,variable", [("layer_norm", "ELECTRA_DS_COMPILED_LAYER_NORM"),
                                         ("gelu", "ELECTRA_DS_COMPILED_GELU")])
def test_compiled_form_choice(op, variable, monkeypatch):
    assert getattr(kernels, f"get_compiled_{op}")() == "traced"
    with pytest.raises(ValueError, match=f"set_compiled_{op}='fused' is not one of traced, opaque"):
        getattr(kernels, f"set_compiled_{op}")("fused")
    try:
        monkeypatch.setenv(variable, "opaque")
        assert getattr(importlib.reload(kernels), f"get_compiled_{op}")() == "opaque"
        monkeypatch.setenv(variable, "fast")
        with pytest.raises(ValueError, match=f"{variable}='fast' is not one of traced, opaque"):
            importlib.reload(kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)


@pytest.mark.parametrize("device", DEVICES)
def test_candidate_row_blockings_match_the_twin(device):
    """Each blocking that `benchmarks/kernel_speed.py --row_configs` times on a GPU computes the twins' LayerNorm
    (dense bias, dropout, residual) and bias + GELU with their gradients, so any of them can become the default."""
    from benchmarks import kernel_speed

    launch = importlib.import_module("electra_ds.kernels.launch")
    x, r = _make((300, 64), torch.bfloat16, device, seed=1), _make((300, 64), torch.bfloat16, device, seed=2)
    w, b = _make((64,), torch.float32, device, seed=3) + 1.0, _make((64,), torch.float32, device, seed=4)
    x_bias = _make((64,), torch.bfloat16, device, seed=5)
    h, h_bias = _make((300, 130), torch.bfloat16, device, scale=3.0, seed=6), _make((130,), torch.bfloat16, device)
    seed = torch.tensor(7, dtype=torch.int64, device=device)
    cases = {"layer_norm": ((x, r, w.detach().requires_grad_(), b, x_bias),
                            lambda impl: lambda x, r, w, b, xb: impl(x, r, w, b, 1e-12, 0.1, seed, xb),
                            kernels.add_layer_norm, reference.add_layer_norm),
             "gelu": ((h, h_bias), lambda impl: impl, kernels.bias_gelu, reference.bias_gelu)}
    expected = {op: _run(wrap(twin), args) for op, (args, wrap, _, twin) in cases.items()}
    configs = kernel_speed.row_configs()
    assert {op for op, _ in configs.values()} == set(cases) and len(configs) == len(set(configs.values()))
    with kernel_backend("triton"):
        for label, (op, config) in configs.items():
            args, wrap, kernel, _ = cases[op]
            with kernel_speed.row_blocking(op, config):
                out, grads = _run(wrap(kernel), args)
            ref_out, ref_grads = expected[op]
            torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16], msg=label)
            for g, ref in zip(grads, ref_grads):
                torch.testing.assert_close(g, ref, **TOL[torch.bfloat16], msg=label)
    assert launch.LAYER_NORM_BACKWARD == launch.Blocking() and launch.GELU_BACKWARD.columns == 128  # restored


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,residual,dropout", [((7, 64), True, 0.1), ((3, 5, 256), True, 0.5),
                                                    ((300, 100), False, 0.1), ((2, 1000), True, 1.0)])
def test_add_layer_norm_dropout(device, dtype, shape, residual, dropout):
    """Dropout inside the kernel keeps the twin's positions (its hash of seed, row, column), bit for bit: the same
    zeros in x's gradient, which the backward gets by drawing the mask a second time."""
    h = shape[-1]
    x = _make(shape, dtype, device, seed=1)
    r = _make(shape, dtype, device, seed=2) if residual else None
    w = (_make((h,), dtype, device, seed=3) + 1.0).detach().requires_grad_()
    b = _make((h,), dtype, device, seed=4)
    seed = torch.tensor(2**40 + 3, dtype=torch.int64, device=device)
    args = (x, r, w, b, 1e-12)
    kernel, twin = _dropout_kernel(dropout, seed), _with_dropout(reference.add_layer_norm, dropout, seed)
    _compare(kernel, twin, args, TOL[dtype])
    dx, ref_dx = _run(kernel, args)[1][0], _run(twin, args)[1][0]
    dropped = ref_dx == 0
    assert torch.equal(dx == 0, dropped)
    assert 0 < dropped.float().mean() < 1 if dropout < 1 else dropped.all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,p", [((7, 64), 0.1), ((3, 5, 96), 0.5), ((300, 100), 0.1), ((2, 1000), 1.0)])
def test_dropout(device, dtype, shape, p):
    """The Triton dropout keeps the twin's positions bit for bit, forward and backward (the backward draws the mask
    again from the seed), with the twin's fp32 scaling (bit for bit too, except that the interpreter truncates fp32
    to bf16 where the twin rounds)."""
    x = _make(shape, dtype, device, seed=1)
    seed = torch.tensor(2**45 + 1, dtype=torch.int64, device=device)
    kernel = importlib.import_module("electra_ds.kernels.hashed_dropout").dropout
    out, (dx,) = _run(lambda t: kernel(t, p, seed), (x,))
    ref_out, (ref_dx,) = _run(lambda t: reference.dropout(t, p, seed), (x,))
    assert out.dtype == ref_out.dtype == dtype
    torch.testing.assert_close(out, ref_out, **(TOL[dtype] if dtype == torch.bfloat16 else dict(atol=0, rtol=0)))
    torch.testing.assert_close(dx, ref_dx, **(TOL[dtype] if dtype == torch.bfloat16 else dict(atol=0, rtol=0)))
    dropped = ~reference.dropout_keep(seed, x.shape, p)
    assert torch.equal(out == 0, dropped | (x == 0))
    assert 0 < dropped.float().mean() < 1 if p < 1 else dropped.all()


def test_hash_uniform_is_lowbias32_over_uint32():
    """The twin's int32 hash against the spec stated in numpy uint32 arithmetic (which wraps by definition), rows up
    to 2**31 - 1, seeds whose low half has its top bit set, and the noise strictly inside (0, 1)."""
    import numpy as np

    def mix(x):
        x = x.astype(np.uint32)
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))

    rows, cols = np.arange(0, 2**31 - 1, 2**24 - 1), np.arange(97)
    for seed in (0, 2**62 - 1, 0x3000_0000_8000_0001, 123456789012345):
        key = mix(np.uint32(seed & 0xFFFFFFFF) ^ mix(np.uint32(seed >> 32) ^ np.uint32(0x9E3779B9)))
        h = mix(mix(key ^ mix(rows))[:, None] ^ mix(cols)[None, :])
        expected = ((h >> np.uint32(8)) | np.uint32(1)).astype(np.float32) * np.float32(2**-24)
        u = reference.hash_uniform(torch.tensor(seed), torch.from_numpy(rows)[:, None], torch.arange(97)[None, :])
        assert np.array_equal(u.numpy(), expected), seed
        assert 0 < u.min() and u.max() < 1


@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_dropout_mixed_residual_dtype(device):
    """With dropout x's and the residual's gradients differ: each is rounded once to its own dtype."""
    x, r = _make((3, 5, 96), torch.bfloat16, device, seed=1), _make((3, 5, 96), torch.float32, device, seed=2)
    w, b = _make((96,), torch.float32, device, seed=3) + 1.0, _make((96,), torch.float32, device, seed=4)
    seed = torch.tensor(9, dtype=torch.int64, device=device)
    args = (x, r, w.detach().requires_grad_(), b, 1e-12)
    out, grads = _run(_dropout_kernel(0.2, seed), args)
    ref_out, ref_grads = _run(_with_dropout(reference.add_layer_norm, 0.2, seed), args)
    torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16])
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [torch.bfloat16] + [torch.float32] * 3
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, **TOL[g.dtype])
    assert torch.equal(grads[0] == 0, ref_grads[0] == 0) and (grads[0] == 0).any() and not (grads[1] == 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 256), (2, 1000), (600, 130)])
def test_bias_gelu(triton_backend, device, dtype, shape):
    x = _make(shape, dtype, device, scale=3.0, seed=1)
    b = _make(shape[-1:], dtype, device, seed=2)
    _compare(kernels.bias_gelu, reference.bias_gelu, (x, b), TOL[dtype])


def _targets(n, v, device, ignore_row=True):
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(5))
    t[0] = v - 1
    if ignore_row and n > 2:
        t[1] = reference.IGNORE_INDEX
    return t.to(device)


def _loss(fn, seed=0, temperature=1.0):
    """The loss output of a cross_entropy_and_sample (kernel or twin) as a function of logits and targets."""
    return lambda x, t: fn(x, t, torch.tensor(seed, device=x.device), temperature, x.shape[-1])[0]


def _draws(fn, logits, seed, temperature=1.0, columns=None):
    """(sample, argmax) of a cross_entropy_and_sample (kernel or twin), seed an int."""
    targets = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    _, sample, argmax = fn(logits, targets, torch.tensor(seed, dtype=torch.int64, device=logits.device), temperature,
                           logits.shape[-1] if columns is None else columns)
    return sample, argmax


def _assert_same_draws(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Same samples and same argmaxes."""
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", [(5, 1000), (3, 30522), (4, 4097), (1, 7)])
def test_cross_entropy(triton_backend, device, dtype, n, v):
    logits = _make((n, v), dtype, device, scale=4.0, seed=1)
    _compare(_loss(kernels.cross_entropy_and_sample), _loss(reference.cross_entropy_and_sample),
             (logits, _targets(n, v, device)), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_mean_and_strided_rows(triton_backend, device):
    base = _make((6, 1200), torch.bfloat16, device, scale=4.0, seed=1)
    targets = _targets(6, 1000, device)

    def mean_loss(fn):
        return lambda x, t: _loss(fn)(x[:, :1000], t).mean()  # rows with stride 1200, an expanded output grad

    _compare(mean_loss(kernels.cross_entropy_and_sample), mean_loss(reference.cross_entropy_and_sample),
             (base, targets), TOL[torch.bfloat16])
    sample, argmax = _draws(kernels.cross_entropy_and_sample, base.detach()[:, :1000], 3)
    _assert_same_draws((sample, argmax), _draws(reference.cross_entropy_and_sample, base.detach()[:, :1000], 3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_backward_twin_is_the_gradient_of_the_loss(dtype):
    """reference.cross_entropy_backward (the compiled op's backward) from the log-sum-exp equals autograd's gradient
    of reference.cross_entropy, ignored rows included."""
    logits = _make((5, 300), dtype, "cpu", scale=4.0, seed=1)
    targets, dloss = _targets(5, 300, "cpu"), torch.randn(5, generator=torch.Generator().manual_seed(2))
    (expected,) = torch.autograd.grad(reference.cross_entropy(logits, targets), logits, dloss)
    lse = torch.logsumexp(logits.detach().float(), -1)
    got = reference.cross_entropy_backward(logits.detach(), targets, lse, dloss)
    assert got.dtype == dtype and bool((got[1] == 0).all())  # row 1 is ignored
    torch.testing.assert_close(got, expected, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_padding_columns_change_no_loss_gradient_or_sample(triton_backend, device, dtype):
    """The training forward pads the generator's logits with -inf columns (electra.VOCAB_MULTIPLE): the kernels and
    their twins give the unpadded rows' loss and samples, and no gradient to the padding."""
    n, v, extra = 5, 4100, 60  # the padding crosses into a second 4096-column block
    logits = _make((n, v), dtype, device, scale=4.0, seed=1, grad=False)
    padded = torch.cat([logits, torch.full((n, extra), float("-inf"), dtype=dtype, device=device)], dim=1)
    targets = _targets(n, v, device)
    loss_fn = _loss(kernels.cross_entropy_and_sample)
    _compare(loss_fn, _loss(reference.cross_entropy_and_sample), (padded.requires_grad_(), targets), TOL[dtype])
    loss, (grad,) = _run(loss_fn, (padded, targets))
    ref_loss, (ref_grad,) = _run(loss_fn, (logits.requires_grad_(), targets))
    torch.testing.assert_close(loss, ref_loss, **TOL[dtype])
    torch.testing.assert_close(grad[:, :v], ref_grad, **TOL[dtype])
    assert bool((grad[:, v:] == 0).all())
    drawn = _draws(kernels.cross_entropy_and_sample, padded.detach(), 11)
    _assert_same_draws(drawn, _draws(kernels.cross_entropy_and_sample, logits.detach(), 11))
    _assert_same_draws(drawn, _draws(reference.cross_entropy_and_sample, padded.detach(), 11))
    # sampling the real columns only gives the same draws, whatever the padding columns hold
    nan_padded = torch.cat([logits, torch.full((n, extra), float("nan"), dtype=dtype, device=device)], dim=1)
    _assert_same_draws(drawn, _draws(kernels.cross_entropy_and_sample, nan_padded, 11, columns=v))
    _assert_same_draws(drawn, _draws(reference.cross_entropy_and_sample, nan_padded, 11, columns=v))


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # interpreter: exp(100) = inf
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("shape", [(3, 37), (2, 1500)])
def test_sigmoid_bce(triton_backend, device, dtype, label_dtype, shape):
    logits = _make(shape, dtype, device, scale=8.0, seed=1)
    with torch.no_grad():
        logits.view(-1)[:6] = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 30.0, 100.0], dtype=dtype)
    labels = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) > 0.5).to(device, label_dtype)
    _compare(kernels.sigmoid_bce, reference.sigmoid_bce, (logits, labels.requires_grad_(False)), TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,temperature,seed,columns", [(5, 1000, 1.0, 0, None), (3, 30522, 1.0, 2**40 + 17, None),
                                                          (4, 5000, 0.5, -3, 4097), (6, 7, 2.0, 123456789, 5)])
def test_gumbel_same_samples_as_twin(triton_backend, device, dtype, n, v, temperature, seed, columns):
    logits = _make((n, v), dtype, device, scale=2.0, seed=1, grad=False)
    sample, argmax = _draws(kernels.cross_entropy_and_sample, logits, seed, temperature, columns)
    assert sample.dtype == argmax.dtype == torch.long and sample.shape == argmax.shape == (n,)
    _assert_same_draws((sample, argmax), _draws(reference.cross_entropy_and_sample, logits, seed, temperature, columns))
    assert torch.equal(argmax, logits[:, :columns].argmax(-1))
    assert torch.equal(sample, reference.gumbel_sample(logits[:, :columns], torch.tensor(seed), temperature).to(device))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # interpreter: the NaN and -inf rows' log-sum-exp
@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_picks_nan_ties_and_infinities_as_the_twin_does(triton_backend, device):
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)).to(device)
    logits[0, 4100] = logits[0, 4700] = float("nan")  # two NaNs in the third 2048-column block: the first wins
    logits[1, 17] = float("inf")
    logits[2, 10], logits[2, 20] = float("inf"), float("nan")  # a NaN beats an earlier +inf
    logits[3] = float("-inf")  # nothing beats -inf: column 0
    logits[4, 4500] = logits[4, 30] = 50.0  # a tie across blocks: the first column, for the argmax
    logits[5, 4097] = logits[5, 4098] = 50.0  # a tie within a block
    sample, argmax = _draws(kernels.cross_entropy_and_sample, logits, 5)
    assert sample.tolist()[:4] == [4100, 17, 20, 0]
    assert argmax.tolist() == [4100, 17, 20, 0, 30, 4097]
    _assert_same_draws((sample, argmax), _draws(reference.cross_entropy_and_sample, logits, 5))


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_seeds_rows_and_shapes(triton_backend, device):
    logits = torch.zeros(6, 50, device=device)  # flat logits: the sample is the noise's argmax
    draw = lambda seed: _draws(kernels.cross_entropy_and_sample, logits, seed)[0]  # noqa: E731
    a = draw(7)
    assert a.shape == (6,) and torch.equal(a, draw(7))
    assert not torch.equal(a, draw(8)) and len(set(a.tolist())) > 1  # seeds and rows change noise
    assert torch.equal(a, reference.gumbel_sample(logits, torch.tensor(7, device=device), 1.0))


def test_gumbel_twin_chunks_change_nothing():
    """The twin's row chunks (one per 2**18 values on a CPU: 8 rows of a 30522 vocabulary) only bound memory: any
    chunking gives each row the noise of its own flat index, hash_uniform(seed, row, col)."""
    logits = torch.randn(4, 5, 60, generator=torch.Generator().manual_seed(0))
    seed = torch.tensor(11)
    whole = reference.gumbel_sample(logits, seed, 0.7, chunk_elements=1 << 22)
    assert whole.shape == (4, 5)
    for chunk in (60, 140, 400):  # 1, 2 and 6 rows per chunk
        assert torch.equal(reference.gumbel_sample(logits, seed, 0.7, chunk_elements=chunk), whole), chunk
    u = reference.hash_uniform(seed, torch.arange(20)[:, None], torch.arange(60)[None, :])
    assert torch.equal(whole.flatten(), (logits.view(20, 60) * (1 / 0.7) - torch.log(-torch.log(u))).argmax(-1))


CHI2_999 = {5: 20.52}  # chi-square 0.999 quantile, 5 degrees of freedom


def _chi2(samples: torch.Tensor, logits: torch.Tensor, temperature: float) -> float:
    counts, expected = softmax_counts(samples, logits, temperature)
    return float(((counts - expected) ** 2 / expected).sum())


ROW = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0, 0.3])


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_kernel_follows_softmax(triton_backend, device):
    logits = ROW.to(device).expand(150, -1)  # rows draw independent noise too
    draws = torch.cat([_draws(kernels.cross_entropy_and_sample, logits, seed, 0.5)[0] for seed in range(8)])
    assert _chi2(draws, ROW, 0.5) < CHI2_999[5]


HOT = [5, 2047, 2048, 3000, 4100, 4195]  # ROW's values at these columns of 4196, over three sampling chunks


@pytest.mark.parametrize("device", DEVICES)
def test_gumbel_kernel_follows_softmax_across_chunks(triton_backend, device):
    """The hierarchical draw over several chunks (reference.SAMPLE_CHUNK columns each): first a chunk by its
    log-sum-exp plus a Gumbel, then a column within it; together softmax over the whole row."""
    assert reference.SAMPLE_CHUNK == 2048
    row = torch.full((4196,), float("-inf"))
    row[HOT] = ROW
    draws = torch.cat([_draws(kernels.cross_entropy_and_sample, row.to(device).expand(100, -1), seed)[0]
                       for seed in range(6)])
    assert set(draws.tolist()) <= set(HOT)
    as_index = torch.tensor([HOT.index(c) for c in draws.tolist()])
    assert _chi2(as_index, ROW, 1.0) < CHI2_999[5]
    assert torch.equal(draws[:100].cpu(), reference.gumbel_sample(row.expand(100, -1), torch.tensor(0), 1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_with_new_seed():
    kernels.set_backend("auto")
    logits = torch.randn(64, 30528, device="cuda")
    targets = torch.randint(0, 30522, (64,), device="cuda")
    seed = torch.tensor(1, dtype=torch.int64, device="cuda")
    kernels.cross_entropy_and_sample(logits, targets, seed, 1.0, 30522)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.cross_entropy_and_sample(logits, targets, seed, 1.0, 30522)
    for s in (5, 6):
        seed.fill_(s)
        graph.replay()
        expected = reference.cross_entropy_and_sample(logits, targets, seed, 1.0, 30522)
        _assert_same_draws(out[1:], expected[1:])
        torch.testing.assert_close(out[0], expected[0], **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_step_with_opaque_layer_norms_and_gelus_equals_the_eager_twins(device, monkeypatch):
    """A whole pretraining step (tiny preset, padding, dropout, fp32) compiled with the encoder LayerNorms and every
    bias + GELU as our opaque ops (the dense layers' biases go to the LayerNorm kernels then): the loss and each flat
    buffer's gradient equal the eager twins'. The forms that the GPU benchmark compares, wired into the model."""
    from electra_ds.model.electra import ElectraForPretraining

    torch.manual_seed(0)
    model = ElectraForPretraining(preset("tiny")).train().to(device)
    ids, mask = make_batch(model.config.vocab_size, batch=2, length=16, pad_from={1: 11})
    ids, mask = ids.to(device), mask.to(device)
    plan = mask_plan(ids, mask, vocab_size=model.config.vocab_size, max_predictions=3, seed=1)
    with kernel_backend("torch"):
        expected = forward_backward(model, ids, mask, plan, 5).loss.detach()
        expected_grads = {k: g.clone() for k, g in flat_grads(model).items()}
    launches = []
    for module in ("layer_norm", "gelu"):
        _record_passes(monkeypatch, module, launches, f"{module}.")
    try:
        kernels.set_compiled_layer_norm("opaque")
        kernels.set_compiled_gelu("opaque")
        with kernel_backend("triton"):
            torch._dynamo.reset()
            loss = forward_backward(torch.compile(model), ids, mask, plan, 5).loss.detach()
    finally:
        kernels.set_compiled_layer_norm("traced")
        kernels.set_compiled_gelu("traced")
    layers = model.config.discriminator.num_hidden_layers + model.config.generator.num_hidden_layers
    assert sorted(set(launches)) == ["gelu.backward_pass", "gelu.forward_pass", "layer_norm.backward_pass",
                                     "layer_norm.forward_pass"]
    assert launches.count("layer_norm.forward_pass") == 2 * layers and launches.count("gelu.forward_pass") == layers + 2
    torch.testing.assert_close(loss, expected, **TOL[torch.float32])
    for name, grad in flat_grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], **TOL[torch.float32], msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_model_ops_trace_twins_and_keep_the_sampling_kernel(device, backend):
    """Under torch.compile (the --compile path): the other autograd ops trace as twins; the generator head's loss and
    draws stay one opaque op (running the Triton kernel, or the twin under the "torch" backend) whose draws equal the
    twin's bit for bit on the same logits, and whose loss and gradient (the backward traced from the twin's formula)
    match the eager op's."""
    x = _make((6, 50), torch.float32, device, seed=3, grad=False)
    bias = _make((50,), torch.float32, device, seed=4, grad=False)
    targets = _targets(6, 47, device)
    seed = torch.tensor(2**33 + 5, dtype=torch.int64, device=device)

    def step(x, bias, targets, seed):
        logits = kernels.bias_gelu(x, bias)
        return (logits, *kernels.cross_entropy_and_sample(logits, targets, seed, 1.0, 47))

    def run(fn):
        b = bias.detach().clone().requires_grad_()
        logits, loss, sample, argmax = fn(x, b, targets, seed)
        loss.sum().backward()
        return logits.detach(), loss.detach(), (sample, argmax), b.grad

    with kernel_backend(backend):
        torch._dynamo.reset()
        logits, loss, drawn, grad = run(torch.compile(step, fullgraph=True, dynamic=False))
        _, eager_loss, _, eager_grad = run(step)
        torch.library.opcheck(torch.ops.electra_ds.cross_entropy_and_sample.default,
                              (logits.clone().requires_grad_(), targets, seed, 1.0, 47))
    torch.testing.assert_close(logits, reference.bias_gelu(x, bias), **TOL[torch.float32])
    _assert_same_draws(drawn, reference.cross_entropy_and_sample(logits, targets, seed, 1.0, 47)[1:])
    torch.testing.assert_close(loss, eager_loss, **TOL[torch.float32])
    torch.testing.assert_close(grad, eager_grad, **TOL[torch.float32])


def test_sample_columns_are_checked_on_every_path():
    logits, targets = torch.zeros(3, 10), torch.zeros(3, dtype=torch.long)
    for columns in (0, 11):
        with pytest.raises(ValueError, match="sample_columns"):
            kernels.cross_entropy_and_sample(logits, targets, torch.tensor(0), 1.0, columns)
    with pytest.raises(ValueError, match=r"logits \(N, V\) and targets \(N,\)"):
        kernels.cross_entropy_and_sample(logits, targets[:2], torch.tensor(0), 1.0)


@pytest.mark.parametrize("device", DEVICES)
# embedding_size 32: embeddings_project (Small); 64 == hidden: none (Base)
@pytest.mark.parametrize("embedding_size,autocast,dropout", [(32, False, 0.0), (64, False, 0.0), (32, True, 0.0),
                                                             (64, True, 0.0), (32, False, 0.1)])
def test_pretraining_step_with_kernels_matches_twins(device, embedding_size, autocast, dropout, monkeypatch):
    """One forward + backward of the whole pretraining model with every Triton kernel against the twins: the same
    Gumbel samples, the same loss and the same gradients up to the precision's rounding (bf16 autocast: about one
    bf16 unit per op, which a few layers accumulate to about 2% of a weight's gradient norm). Under autocast a
    generator logit one bf16 unit off can flip a near-tie sample, so there the kernel run gets the twin run's
    samples (the samplers themselves are compared bit for bit above and in fp32 here). With dropout, both runs start
    from the same torch seed and so drop the same positions."""
    vocab = 128
    config = preset("tiny", vocab_size=vocab, embedding_size=embedding_size, hidden_dropout_prob=dropout,
                    attention_probs_dropout_prob=dropout)
    model = perturbed(config, 0.05, training=True).to(device)
    ids, mask = make_batch(vocab, batch=2, length=16, pad_from={1: 11}, seed=1)
    ids, mask = ids.to(device), mask.to(device)
    plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=3, seed=1)

    def step(backend):
        torch.manual_seed(7)
        with kernel_backend(backend):
            out = forward_backward(model, ids, mask, plan, 5, autocast)
        grads = flat_grads(model)
        return out, grads, model.views(flats=grads)

    draws = []
    op = kernels.cross_entropy_and_sample

    def recorded(*args, **kw):
        loss, *drawn = op(*args, **kw)
        draws.append(drawn)
        return loss, *drawn

    def handed_over(*args, **kw):
        return op(*args, **kw)[0], *draws[0]

    monkeypatch.setattr(kernels, "cross_entropy_and_sample", recorded)
    ref, ref_flat, ref_grads = step("torch")
    assert len(draws) == 1  # the model draws through kernels.cross_entropy_and_sample, which the handover replaces
    if autocast:
        monkeypatch.setattr(kernels, "cross_entropy_and_sample", handed_over)
    out, flat, grads = step("triton")
    assert torch.equal(out.disc_input, ref.disc_input)  # under autocast: the samples handed over, as they were used
    rtol, grad_tol = (2e-3, 5e-2) if autocast else (1e-5, 1e-4)
    for name in ("loss", "mlm_loss", "disc_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=rtol, atol=0)
    if not autocast:  # the counts, the generator's argmax hits among them (autocast may flip a near tie)
        assert torch.equal(out.stats, ref.stats)

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert all(rel(flat[k], ref_flat[k]) < grad_tol for k in flat)
    # Each weight's gradient; the attention key bias's is zero but for rounding (softmax ignores a shift per query).
    worst = max((rel(grads[k], ref_grads[k]), k) for k in grads if not k.endswith("key.bias"))
    assert worst[0] < grad_tol, worst


def test_backend_choice(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "bias_gelu", lambda x, b: calls.append("twin") or x + b)
    kernels.set_backend("auto")
    kernels.bias_gelu(torch.zeros(2, 3), torch.zeros(3))
    kernels.set_backend("torch")
    kernels.bias_gelu(torch.zeros(2, 3), torch.zeros(3))
    kernels.set_backend("auto")
    assert calls == ["twin", "twin"]
    with pytest.raises(ValueError, match="'cuda' is not one of auto, triton, torch"):
        kernels.set_backend("cuda")
    assert kernels.get_backend() == "auto"


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch, triton_backend):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.bias_gelu(torch.zeros(2, 3), torch.zeros(3))


def test_backend_from_environment(monkeypatch):
    try:
        monkeypatch.setenv("ELECTRA_DS_KERNELS", "torch")
        assert importlib.reload(kernels).get_backend() == "torch"
        monkeypatch.setenv("ELECTRA_DS_KERNELS", "fast")
        with pytest.raises(ValueError, match="ELECTRA_DS_KERNELS='fast'"):
            importlib.reload(kernels)
    finally:
        monkeypatch.undo()
        importlib.reload(kernels)
