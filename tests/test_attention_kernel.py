"""The Triton self-attention (kernels/fused_attention.py) against its twin (reference.attention), forward and backward,
eager and under torch.compile.

Without CUDA the kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, which conftest.py
sets); with CUDA the same comparisons run compiled on the GPU (marked `gpu`).
"""
from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from electra_ds import kernels  # noqa: E402
from electra_ds.kernels import reference  # noqa: E402
from model_helpers import kernel_backend, kernel_devices, randn  # noqa: E402

DEVICES = kernel_devices()
# Both sides compute in fp32, but the kernel rounds the probabilities and their gradients to the input dtype before
# each matrix product (as flash attention does): a few units of that dtype's last place, relative to the largest
# value of a row, hence an absolute tolerance.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
       torch.float16: dict(atol=5e-3, rtol=4e-3)}


def _inputs(batch, length, heads, head_size, dtype, device, mask_dtype=None):
    """qkv, and a key mask of `mask_dtype` (None: no mask): the first sequence padded from the middle, the last one
    all padding, and with three or more sequences the second one padded over its first half, at most 64 keys (a
    whole first tile from 128 keys on: the online softmax starts over on the next)."""
    qkv = randn((batch, length, 3 * heads * head_size), 1, dtype, device)
    mask = None
    if mask_dtype is not None:
        mask = torch.ones(batch, length, dtype=mask_dtype)
        mask[0, length // 2:] = 0
        mask[-1] = 0
        if batch > 2:
            mask[1, :min(64, length // 2)] = 0
        mask = mask.to(device)
    return qkv, mask


def _run(fn, qkv, *args):
    qkv = qkv.detach().clone().requires_grad_()
    out = fn(qkv, *args)
    out.backward(randn(out.shape, 2, out.dtype, out.device))
    return out.detach(), qkv.grad


def _kernel(*args):
    return importlib.import_module("electra_ds.kernels.fused_attention").attention(*args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# heads x head size: hidden 64 (one 64-wide head: the generator), 256 (ELECTRA-Small), 768 (Base), 24 (head size 8,
# padded to 16 in the kernel) and 48 (head size 24, padded to 32); lengths: within one tile, two whole tiles, three
# with a partial one
@pytest.mark.parametrize("batch,length,heads,head_size,mask_dtype,dropout", [
    (2, 20, 1, 64, torch.long, 0.0), (2, 70, 4, 64, None, 0.1), (1, 130, 12, 64, None, 0.0),
    (3, 33, 3, 8, torch.long, 0.3), (2, 33, 2, 24, None, 0.2), (3, 130, 2, 64, torch.bool, 0.1),
    (2, 128, 1, 64, torch.long, 0.0)])
def test_attention_matches_twin(device, dtype, batch, length, heads, head_size, mask_dtype, dropout):
    """Output and QKV gradient against the twin, whose dropout mask is the same hash: a different mask would move
    values by far more than the tolerance. A sequence of padding only attends uniformly, in both."""
    qkv, mask = _inputs(batch, length, heads, head_size, dtype, device, mask_dtype)
    seed = torch.tensor(2**41 + 9, dtype=torch.int64, device=device) if dropout else None
    out, grad = _run(_kernel, qkv, heads, mask, dropout, seed)
    ref_out, ref_grad = _run(reference.attention, qkv, heads, mask, dropout, seed)
    assert out.dtype == grad.dtype == dtype and out.shape == (batch, length, heads * head_size)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad, **TOL[dtype])
    if dropout:
        assert not torch.allclose(out, _run(_kernel, qkv, heads, mask, 0.0, None)[0], **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_dropout_keeps_the_twins_probabilities(device):
    """With v one-hot per key position, the context is the dropped probability matrix itself: its zeros are the
    twin's `dropout_keep` mask bit for bit, and the kept values are the probabilities times 1 / (1 - p)."""
    length, p = 24, 0.4
    qkv = randn((2, length, 3 * 32), 3, torch.float32, device)
    qkv[..., 64:] = 0
    qkv[..., 64:64 + length] = torch.eye(length, device=device)  # v[key] = e_key: the context row is the probs row
    seed = torch.tensor(77, dtype=torch.int64, device=device)
    out = _kernel(qkv, 1, None, p, seed)[..., :length]
    keep = reference.dropout_keep(seed, torch.Size((2, 1, length, length)), p)[:, 0]
    assert torch.equal(out != 0, keep)
    probs = reference.attention(qkv, 1, None, 0.0, None)[..., :length]
    torch.testing.assert_close(out, torch.where(keep, probs / (1 - p), 0.0), **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_attention_takes_strided_masks(triton_backend, device):
    """A key mask sliced from a wider one, or one row expanded over the batch, reads as its values (the kernels
    index it as a contiguous (B, L) tensor)."""
    qkv = randn((3, 40, 3 * 32), 4, torch.float32, device)
    wide = (torch.arange(50, device=device) < 30).long().expand(3, 50).clone()
    for mask in (wide[:, :40], (torch.arange(40, device=device) < 25).expand(3, 40)):
        assert not mask.is_contiguous()
        torch.testing.assert_close(kernels.attention(qkv, 2, mask), reference.attention(qkv, 2, mask),
                                   **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_one_kernel_up_to_the_one_pass_length(device, monkeypatch):
    """Half precision up to `one_pass` (128) tokens: one backward launch per head, holding every key and writing dQ as
    well; longer sequences and fp32: a dK/dV launch per key tile, then a dQ launch per query tile. Each matches the
    twin (the same kernels against it: test_attention_matches_twin)."""
    fused_attention = importlib.import_module("electra_ds.kernels.fused_attention")
    kernel, launches = fused_attention._electra_attention_bwd, []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid[1], kwargs["FOR_Q"], kwargs["WITH_DQ"], kwargs["BLOCK_N"]))  # tiles per head
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fused_attention, "_electra_attention_bwd", Recording())
    for dtype, length, expected in ((torch.bfloat16, 70, [(1, False, True, 128)]),
                                    (torch.bfloat16, 130, [(3, False, False, 64), (3, True, False, 64)]),
                                    (torch.float32, 70, [(3, False, False, 32), (3, True, False, 32)])):
        launches.clear()
        qkv = randn((1, length, 3 * 16), 5, dtype, device)
        out, grad = _run(_kernel, qkv, 1, None, 0.0, None)
        assert launches == expected, (dtype, length)
        torch.testing.assert_close(grad, _run(reference.attention, qkv, 1, None, 0.0, None)[1], **TOL[dtype])


def test_attention_checks_its_arguments():
    with pytest.raises(ValueError, match="QKV product"):
        kernels.attention(torch.zeros(2, 5, 10), 4)
    with pytest.raises(ValueError, match="key_mask"):
        kernels.attention(torch.zeros(2, 5, 12), 2, torch.ones(2, 4))
    with pytest.raises(ValueError, match="dropout probability"):
        kernels.attention(torch.zeros(2, 5, 12), 2, None, 1.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_attention(device, backend, monkeypatch):
    """Under torch.compile: with the Triton backend the kernels run as opaque custom ops (once forward, once backward;
    checked by opcheck), with "torch" the twin traces into inductor's kernels; either way the output and gradient
    equal the eager twin's, dropout mask included."""
    qkv, mask = _inputs(2, 40, 2, 16, torch.float32, device, torch.long)
    seed = torch.tensor(5, dtype=torch.int64, device=device)
    fused_attention = importlib.import_module("electra_ds.kernels.fused_attention")
    launches = []
    for name in ("forward_pass", "backward_pass"):
        monkeypatch.setattr(fused_attention, name, lambda *a, _f=getattr(fused_attention, name), _n=name:
                            launches.append(_n) or _f(*a))

    def fn(qkv, mask, seed):
        return kernels.attention(qkv, 2, mask, 0.2, seed)

    with kernel_backend(backend):
        torch._dynamo.reset()
        out, grad = _run(torch.compile(fn, fullgraph=True, dynamic=False), qkv, mask, seed)
        assert launches == (["forward_pass", "backward_pass"] if backend == "triton" else [])
        if backend == "triton":
            torch.library.opcheck(torch.ops.electra_ds.attention.default, (qkv.clone().requires_grad_(), mask, seed,
                                                                          2, 0.2))
    ref_out, ref_grad = _run(reference.attention, qkv, 2, mask, 0.2, seed)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(grad, ref_grad, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_cuda_graph_replays_with_new_seed():
    """Captured in a CUDA graph (as the compiled step is), forward and backward redraw the dropout mask from the seed
    tensor's value at each replay: the twin's output and gradient for each new seed."""
    qkv = randn((4, 128, 3 * 256), 1, torch.bfloat16, "cuda").requires_grad_()
    grad_out = randn((4, 128, 256), 2, torch.bfloat16, "cuda")
    seed = torch.tensor(1, dtype=torch.int64, device="cuda")

    def step():
        out = _kernel(qkv, 4, None, 0.1, seed)
        return out, torch.autograd.grad(out, qkv, grad_out)[0]

    step()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grad = step()
    for s in (5, 6):
        seed.fill_(s)
        graph.replay()
        ref_out, ref_grad = _run(reference.attention, qkv, 4, None, 0.1, seed.clone())
        torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16])
        torch.testing.assert_close(grad, ref_grad, **TOL[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_candidate_blockings_match_the_twin(device):
    """Each blocking that `benchmarks/kernel_speed.py --attention_configs` times on a GPU computes the twin's
    attention (bf16, a padding mask, dropout), so any of them can become the default."""
    from benchmarks import kernel_speed

    fused_attention = importlib.import_module("electra_ds.kernels.fused_attention")
    qkv, mask = _inputs(2, 70, 2, 32, torch.bfloat16, device, torch.long)
    seed = torch.tensor(3, dtype=torch.int64, device=device)
    ref_out, ref_grad = _run(reference.attention, qkv, 2, mask, 0.1, seed)
    configs = kernel_speed.attention_configs()
    assert len({c.block for c in configs.values()}) > 1 and len({c.one_pass for c in configs.values()}) > 1
    for label, config in configs.items():
        with kernel_speed.attention_blocking(config):
            out, grad = _run(_kernel, qkv, 2, mask, 0.1, seed)
        torch.testing.assert_close(out, ref_out, **TOL[torch.bfloat16], msg=label)
        torch.testing.assert_close(grad, ref_grad, **TOL[torch.bfloat16], msg=label)
    assert fused_attention.CONFIGS["half"] is configs["64 x 64, one-pass backward (default)"]  # restored
