"""Fused ops used by the model: a Triton kernel per op, and a plain-PyTorch twin (reference.py) that is its
specification. Under torch.compile the ops trace as their twins, which inductor fuses into its own kernels (dropout
masks included: the same hash, so the same masks as without compile), except `cross_entropy_and_sample` and
`attention`, which stay opaque custom ops (see there), and optionally the residual LayerNorms of `add_layer_norm`
(set_compiled_layer_norm, or the ELECTRA_DS_COMPILED_LAYER_NORM environment variable) and `bias_gelu`
(set_compiled_gelu, ELECTRA_DS_COMPILED_GELU).

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
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import reference
from .launch import gelu_partials_shape, layer_norm_partials_shape

BACKENDS = ("auto", "triton", "torch")
COMPILED_FORMS = ("traced", "opaque")


def _checked(name: str, choices: tuple[str, ...], source: str) -> str:
    if name not in choices:
        raise ValueError(f"{source}={name!r} is not one of {', '.join(choices)}")
    return name


_backend = _checked(os.environ.get("ELECTRA_DS_KERNELS", "auto"), BACKENDS, "ELECTRA_DS_KERNELS")
_compiled_layer_norm = _checked(os.environ.get("ELECTRA_DS_COMPILED_LAYER_NORM", "traced"), COMPILED_FORMS,
                                "ELECTRA_DS_COMPILED_LAYER_NORM")
_compiled_gelu = _checked(os.environ.get("ELECTRA_DS_COMPILED_GELU", "traced"), COMPILED_FORMS,
                          "ELECTRA_DS_COMPILED_GELU")


def set_backend(name: str) -> None:
    """Choose "auto", "triton" or "torch" for every op from now on."""
    global _backend
    _backend = _checked(name, BACKENDS, "set_backend")


def get_backend() -> str:
    return _backend


def set_compiled_layer_norm(mode: str) -> None:
    """How torch.compile treats the residual LayerNorms of `add_layer_norm` from the next compile on: "traced" or
    "opaque" (see there). Speed only: both compute the twin's function."""
    global _compiled_layer_norm
    _compiled_layer_norm = _checked(mode, COMPILED_FORMS, "set_compiled_layer_norm")


def get_compiled_layer_norm() -> str:
    return _compiled_layer_norm


def set_compiled_gelu(mode: str) -> None:
    """How torch.compile treats `bias_gelu` from the next compile on: "traced" or "opaque" (see there). Speed only:
    both compute the twin's function."""
    global _compiled_gelu
    _compiled_gelu = _checked(mode, COMPILED_FORMS, "set_compiled_gelu")


def get_compiled_gelu() -> str:
    return _compiled_gelu


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


def _dropout_seed(p: float, seed: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability {p} is outside [0, 1]")
    if p == 0:
        return None
    if seed is None:
        return torch.randint(2**62, (), device=device)
    if seed.dim() != 0 or seed.dtype != torch.int64:
        raise ValueError(f"a dropout seed is a 0-d int64 tensor, got {seed.dtype} of shape {tuple(seed.shape)}")
    return seed


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, dropout: float = 0.0, seed: torch.Tensor | None = None,
                   x_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dimension (x_bias, the bias of the matrix product x,
    and residual may be None), fp32 statistics.

    Dropout (pass 0.0 outside training) keeps the values that `reference.dropout_keep` picks by a hash of (seed, row,
    column): the same mask from the kernel and the twin, compiled or not. seed is a 0-d int64 tensor on any device
    (no host sync); None draws one from torch's generator on x's device.

    Under torch.compile the twin traces into inductor's kernels (one forward kernel; in the backward about six, split
    reductions for the weight's and the bias's gradients and the preceding product's bias's among them), unless
    `set_compiled_layer_norm` (or the ELECTRA_DS_COMPILED_LAYER_NORM environment variable) says "opaque": then a
    LayerNorm with a residual (the encoder layers') stays one custom op where the Triton kernels run, a backward kernel
    that reads its inputs once and writes per-program column sums (`launch.LAYER_NORM_BACKWARD`), which inductor adds
    up (README, "Measured speed", has the launch counts). The others (embeddings, generator head) trace either way:
    inductor fuses them with embedding lookups and the GELU.
    """
    seed = _dropout_seed(dropout, seed, x.device)
    if layer_norm_is_opaque(x, residual):
        return _layer_norm_op(x, x_bias, residual, weight, bias, seed, float(eps), float(dropout))[0]
    if torch.compiler.is_compiling():
        return _recomputed_in_backward(reference.add_layer_norm, x, residual, weight, bias, eps, dropout, seed,
                                       x_bias)
    return reference.add_layer_norm(x, residual, weight, bias, eps, dropout, seed, x_bias)


def layer_norm_is_opaque(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether `add_layer_norm(x, residual, ...)` runs our Triton kernels (eagerly where the backend picks them,
    under torch.compile as the "opaque" custom op). They add a matrix product's bias (x_bias) and sum its gradient
    at no cost; inductor's code for the twin does worse with x_bias than with the bias in the product (its
    LayerNorm reductions of 256 columns turn from one-pass to two-pass ones, the dropout hash stored between), so the
    model passes the bias to whichever adds it (`model.layers.dense_add_layer_norm`)."""
    if torch.compiler.is_compiling():
        return residual is not None and _opaque(x, _compiled_layer_norm)
    return _use_triton(x)


def _opaque(x: torch.Tensor, mode: str) -> bool:
    """Whether torch.compile keeps an op whose compiled form is `mode` as our Triton kernels for x."""
    return mode == "opaque" and _compiles_triton(x)


def _compiles_triton(t: torch.Tensor) -> bool:
    """Whether torch.compile should keep our Triton kernels for t: the backend's choice as it can be traced (not the
    import check; compiling for CUDA needs triton anyway)."""
    return _backend == "triton" or (_backend == "auto" and t.is_cuda)


@torch.library.custom_op("electra_ds::add_layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor, seed: torch.Tensor | None, eps: float,
                   dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, statistics): the statistics are kept for the backward (layer_norm.forward_pass)."""
    return _op("layer_norm").forward_pass(x, x_bias, residual, weight, bias, eps, dropout, seed)


@_layer_norm_op.register_fake
def _layer_norm_outputs(x: torch.Tensor, x_bias: torch.Tensor | None, residual: torch.Tensor | None,
                        weight: torch.Tensor, bias: torch.Tensor, seed: torch.Tensor | None, eps: float,
                        dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(2, rows, dtype=torch.float32)


@torch.library.custom_op("electra_ds::add_layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, x_bias: torch.Tensor | None,
                            residual: torch.Tensor | None, weight: torch.Tensor, stats: torch.Tensor,
                            seed: torch.Tensor | None,
                            dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x's gradient, the residual's (empty without one), column-sum partials): layer_norm.backward_pass."""
    return _op("layer_norm").backward_pass(dy, x, x_bias, residual, weight, stats, seed, dropout)


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_outputs(dy: torch.Tensor, x: torch.Tensor, x_bias: torch.Tensor | None,
                                 residual: torch.Tensor | None, weight: torch.Tensor, stats: torch.Tensor,
                                 seed: torch.Tensor | None,
                                 dropout: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dres = x.new_empty(0) if residual is None else torch.empty_like(residual, memory_format=torch.contiguous_format)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), dres,
            x.new_empty(layer_norm_partials_shape(x.shape, x.device, x_bias is not None), dtype=torch.float32))


def _save_layer_norm(ctx, inputs: tuple, output: tuple) -> None:
    x, x_bias, residual, weight, bias, seed, _eps, ctx.dropout = inputs
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(x, x_bias, residual, weight, seed, output[1])
    ctx.mark_non_differentiable(output[1])


def _layer_norm_backward(ctx, dy: torch.Tensor, _dstats: torch.Tensor) -> tuple:
    x, x_bias, residual, weight, seed, stats = ctx.saved_tensors
    dx, dres, partials = _layer_norm_backward_op(dy, x, x_bias, residual, weight, stats, seed, ctx.dropout)
    # a sum per gradient, not one of all partials: then each is a reduction over H columns, and inductor fuses the
    # cast and the copy into its parameter buffer's gradient into it
    dweight, dbias, *dx_bias = (partials[:, i].sum(0) for i in range(partials.shape[1]))
    return (dx, dx_bias[0].to(x_bias.dtype) if dx_bias else None, None if residual is None else dres,
            dweight.to(weight.dtype), dbias.to(ctx.bias_dtype), None, None, None)


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_save_layer_norm)


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor | None = None) -> torch.Tensor:
    """Dropout with `add_layer_norm`'s hashed mask: x kept where `reference.dropout_keep(seed, x.shape, p)` holds and
    scaled by 1 / (1 - p), else 0 (pass p 0.0 outside training: x itself). seed as in add_layer_norm."""
    seed = _dropout_seed(p, seed, x.device)
    if seed is None:
        return x
    impl = _op("hashed_dropout") if _use_triton(x) else reference
    return impl.dropout(x, p, seed)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias.

    Under torch.compile the twin traces into inductor's kernels: for GPU code (where the backend picks Triton) in the
    form of `_TracedBiasGelu` (forward one kernel, which also stores the GELU's slope; backward one, and a matrix
    product for the bias's gradient), for CPU code (C++, which took inductor minutes longer to generate for that
    form) as it is, in `_recomputed_in_backward`; unless `set_compiled_gelu` (or the ELECTRA_DS_COMPILED_GELU
    environment variable) says "opaque": then it stays one custom op where the Triton kernels run, a backward kernel
    that computes the erf once and writes the input's gradient and per-program column sums of it, which inductor
    adds up."""
    if torch.compiler.is_compiling():
        if _opaque(x, _compiled_gelu):
            return _gelu_op(x, bias)
        if _compiles_triton(x):
            return _TracedBiasGelu.apply(x, bias)
        return _recomputed_in_backward(reference.bias_gelu, x, bias)
    return _gelu_op(x, bias) if _use_triton(x) else reference.bias_gelu(x, bias)


class _TracedBiasGelu(torch.autograd.Function):
    """reference.bias_gelu as torch.compile traces it. In inductor's kernels the GELU's erf and exp, not memory, bound
    its backward: so the forward, which computes the erf anyway, stores the GELU's slope for the backward in place of
    the input that autograd's backward keeps and computes the erf from again. For half-precision inputs the slope is
    stored in 2 bytes as a multiple of 2**-14 in int16 (it lies in [-0.13, 1.13]: an error below 2**-15, finer than
    bf16's rounding above 0.008; inductor would undo an fp16 copy and store the fp32 slope, 4 bytes a value). Which
    values the backward keeps is the partitioner's choice: in the model's step it keeps the slope (inductor_census),
    though in a graph whose GELU input is kept anyway it may compute the slope again.
    The bias's gradient is the column sum of the input's gradient in the input's dtype, the buffer the next matrix
    products read, by a matrix product with a row of ones: summing the fp32 gradient made inductor compute it again
    in a reduction kernel of its own. Both differ from the twin's gradients by rounding only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        z = x.float() + bias.float()
        slope = 0.5 * (1.0 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327
        half = x.dtype in (torch.bfloat16, torch.float16)
        ctx.save_for_backward(torch.round(slope * _SLOPE_SCALE).to(torch.int16) if half else slope)
        ctx.bias_dtype = bias.dtype
        return torch.nn.functional.gelu(z).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slope, = ctx.saved_tensors
        if slope.dtype == torch.int16:
            slope = slope.float() * (1.0 / _SLOPE_SCALE)
        dx = (dy.float() * slope).to(dy.dtype)
        rows = dx.reshape(-1, dx.shape[-1])
        return dx, (rows.new_ones(1, rows.shape[0]) @ rows)[0].to(ctx.bias_dtype)


_SLOPE_SCALE = 2.0 ** 14


@torch.library.custom_op("electra_ds::bias_gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _op("gelu").forward_pass(x, bias)


@_gelu_op.register_fake
def _gelu_output(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("electra_ds::bias_gelu_backward", mutates_args=())
def _gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x's gradient, the bias gradient's partials): gelu.backward_pass."""
    return _op("gelu").backward_pass(dy, x, bias)


@_gelu_backward_op.register_fake
def _gelu_backward_outputs(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(gelu_partials_shape(x.shape, x.device), dtype=torch.float32))


def _save_gelu(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _gelu_backward(ctx, dy: torch.Tensor) -> tuple:
    x, bias = ctx.saved_tensors
    dx, partials = _gelu_backward_op(dy, x, bias)
    return dx, partials.sum(0).to(bias.dtype)


_gelu_op.register_autograd(_gelu_backward, setup_context=_save_gelu)


def _recomputed_in_backward(twin, *args):
    """twin(*args) under torch.compile, in a selective activation checkpoint that keeps only half-precision values:
    its inputs (a matrix product's output and the residual stream, in memory anyway) and its result, which the next
    op's backward reads; the backward recomputes the fp32 values in between. Left alone, inductor's partitioner
    computes them in the forward and stores them for the backward (the GELU's derivative and LayerNorm's normalised
    input in fp32, 4 bytes per value, and the dropout mask), written there and read back, where the half-precision
    inputs (2 bytes per value) are written anyway. The dropout seed is drawn before (`_dropout_seed`), so the
    recomputation draws the same mask."""
    return checkpoint(twin, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, _keep_half_precision))


def _keep_half_precision(_ctx, op, *_args, **kwargs) -> CheckpointPolicy:
    """Save the casts to bf16/fp16 (a twin's result); recompute the rest (fp32 values) in the backward."""
    if op is torch.ops.aten._to_copy.default and kwargs.get("dtype") in (torch.bfloat16, torch.float16):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def attention(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None = None, dropout: float = 0.0,
              seed: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of a QKV product (B, L, 3 * hidden) -> the context (B, L, hidden); key_mask (B, L):
    0 for padding keys (None: no padding). Dropout (pass 0.0 outside training) on the probabilities keeps those that
    `reference.dropout_keep` picks by a hash of (seed, (batch * heads + head) * L + query, key): the same mask from
    the kernel and the twin. See reference.attention.

    Under torch.compile the Triton kernels stay opaque custom ops (inductor would build the L x L probabilities in
    memory from the twin); where they do not run (CPU tensors, backend "torch") the twin traces into inductor's
    kernels."""
    if qkv.dim() != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"attention wants a QKV product (B, L, 3 * heads * head size) for {heads} heads, got "
                         f"{tuple(qkv.shape)}")
    if key_mask is not None:
        if key_mask.shape != qkv.shape[:2]:
            raise ValueError(f"attention's key_mask must be (B, L) = {tuple(qkv.shape[:2])}, got "
                             f"{tuple(key_mask.shape)}")
        key_mask = key_mask.contiguous()  # the kernels read row b at b * L
    qkv = qkv.contiguous()  # and q, k, v of token t at t * 3 * hidden
    seed = _dropout_seed(dropout, seed, qkv.device)
    if torch.compiler.is_compiling():
        if _compiles_triton(qkv):
            return _attention_op(qkv, key_mask, seed, heads, dropout)[0]
        return reference.attention(qkv, heads, key_mask, dropout, seed)
    impl = _op("fused_attention") if _use_triton(qkv) else reference
    return impl.attention(qkv, heads, key_mask, dropout, seed)


@torch.library.custom_op("electra_ds::attention", mutates_args=())
def _attention_op(qkv: torch.Tensor, key_mask: torch.Tensor | None, seed: torch.Tensor | None, heads: int,
                  dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, softmax statistics): the statistics are kept for the backward (fused_attention.forward_pass)."""
    return _op("fused_attention").forward_pass(qkv, heads, key_mask, dropout, seed)


@_attention_op.register_fake
def _attention_outputs(qkv: torch.Tensor, key_mask: torch.Tensor | None, seed: torch.Tensor | None, heads: int,
                       dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, width = qkv.shape
    return qkv.new_empty(batch, length, width // 3), qkv.new_empty(2, batch * heads, length, dtype=torch.float32)


@torch.library.custom_op("electra_ds::attention_backward", mutates_args=())
def _attention_backward_op(dout: torch.Tensor, qkv: torch.Tensor, key_mask: torch.Tensor | None,
                           seed: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, heads: int,
                           dropout: float) -> torch.Tensor:
    return _op("fused_attention").backward_pass(dout, qkv, key_mask, seed, out, stats, heads, dropout)


@_attention_backward_op.register_fake
def _attention_backward_outputs(dout: torch.Tensor, qkv: torch.Tensor, key_mask: torch.Tensor | None,
                                seed: torch.Tensor | None, out: torch.Tensor, stats: torch.Tensor, heads: int,
                                dropout: float) -> torch.Tensor:
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _save_attention(ctx, inputs: tuple, output: tuple) -> None:
    qkv, key_mask, seed, ctx.heads, ctx.dropout = inputs
    ctx.save_for_backward(qkv, key_mask, seed, *output)
    ctx.mark_non_differentiable(output[1])


def _attention_backward(ctx, dout: torch.Tensor, _dstats: torch.Tensor) -> tuple:
    qkv, key_mask, seed, out, stats = ctx.saved_tensors
    return _attention_backward_op(dout, qkv, key_mask, seed, out, stats, ctx.heads, ctx.dropout), None, None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_save_attention)


_FEW_TYPES = 8  # token-type tables up to this size are looked up by `where` in GPU code (ELECTRA's has 2 rows)


def token_type_embedding(token_type_ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """types[token_type_ids]: F.embedding's values.

    Under torch.compile for GPU code (where the backend picks Triton) a table of a few rows is looked up by `where`,
    row by row, so its gradient is a sum over each type's tokens: inductor's embedding backward adds each token's
    gradient into its row with atomics, a batch's 16384 tokens into one or two rows, one after another (its kernel
    took about 85 us per tower on an H200). Ids outside [0, rows) then select row 0 (a check would wait on the GPU);
    the data pipelines make 0 and 1. Eagerly and for CPU code, F.embedding as before."""
    if not (torch.compiler.is_compiling() and _compiles_triton(types) and types.shape[0] <= _FEW_TYPES):
        return torch.nn.functional.embedding(token_type_ids, types)
    out = types[0].expand(*token_type_ids.shape, types.shape[1])
    for t in range(1, types.shape[0]):
        out = torch.where((token_type_ids == t).unsqueeze(-1), types[t], out)
    return out


def sigmoid_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-element binary cross-entropy with logits, in fp32."""
    impl = _op("bce") if _use_triton(logits) else reference
    return impl.sigmoid_bce(logits, labels)


def cross_entropy_and_sample(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor, temperature: float,
                             sample_columns: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generator head's loss and draws, from one pass over logits (N, V): per row the fp32 cross-entropy against
    targets (N,) (target -100 gives 0; the only output with a gradient), and the (hierarchical) Gumbel-max sample
    (reference.gumbel_sample) and the plain argmax (long) of the first `sample_columns` columns (all when None). The
    noise is fp32 and depends only on (seed, row, col); seed is a 0-d int64 device tensor (no host sync).

    Under torch.compile the forward stays one opaque op (the Triton kernel on CUDA, the twin elsewhere: the draw's
    chunk choice and per-column noise are not pointwise ops that inductor would fuse), and its backward, a pointwise
    formula (reference.cross_entropy_backward), traces into inductor's kernels."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_and_sample wants logits (N, V) and targets (N,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    columns = logits.shape[-1] if sample_columns is None else sample_columns
    if not 0 < columns <= logits.shape[-1]:
        raise ValueError(f"sample_columns={columns} is outside 1..{logits.shape[-1]} (the logits' columns)")
    if torch.compiler.is_compiling():
        loss, _, sample, argmax = _cross_entropy_and_sample_op(logits, targets, seed, temperature, columns)
        return loss, sample, argmax
    impl = _op("xentropy") if _use_triton(logits) else reference
    return impl.cross_entropy_and_sample(logits, targets, seed, temperature, columns)


@torch.library.custom_op("electra_ds::cross_entropy_and_sample", mutates_args=())
def _cross_entropy_and_sample_op(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor, temperature: float,
                                 sample_columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, log-sum-exp, sample, argmax): the log-sum-exp is kept for the backward."""
    if _use_triton(logits):
        return _op("xentropy").forward_pass(logits, targets, seed, temperature, sample_columns)
    loss, sample, argmax = reference.cross_entropy_and_sample(logits, targets, seed, temperature, sample_columns)
    return loss, torch.logsumexp(logits.float(), dim=-1), sample, argmax


@_cross_entropy_and_sample_op.register_fake
def _cross_entropy_and_sample_outputs(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor,
                                      temperature: float, sample_columns: int
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.long), logits.new_empty(n, dtype=torch.long))


def _save_for_backward(ctx, inputs: tuple, output: tuple) -> None:
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.mark_non_differentiable(*output[1:])  # the log-sum-exp too: its gradient would be dropped


def _cross_entropy_and_sample_backward(ctx, dloss: torch.Tensor, *_: torch.Tensor) -> tuple:
    logits, targets, lse = ctx.saved_tensors
    return reference.cross_entropy_backward(logits, targets, lse, dloss), None, None, None, None


_cross_entropy_and_sample_op.register_autograd(_cross_entropy_and_sample_backward, setup_context=_save_for_backward)


def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_scale: torch.Tensor | None = None) -> None:
    """One in-place ElectraAdam step in fp32 (no bias correction, decoupled weight decay): updates param (any
    float dtype), exp_avg and exp_avg_sq (fp32), all contiguous with param's numel. grad is multiplied by
    grad_scale, a 0-d fp32 tensor on param's device read there (no host sync), or by 1 when None."""
    impl = _op("adam") if _use_triton(param) else reference
    impl.adam_step(param, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                   weight_decay=weight_decay, grad_scale=grad_scale)


__all__ = ["BACKENDS", "COMPILED_FORMS", "adam_step", "add_layer_norm", "attention", "bias_gelu",
           "cross_entropy_and_sample", "dropout", "get_backend", "get_compiled_gelu", "get_compiled_layer_norm",
           "layer_norm_is_opaque", "reference", "set_backend", "set_compiled_gelu", "set_compiled_layer_norm",
           "sigmoid_bce", "token_type_embedding", "triton_available"]
