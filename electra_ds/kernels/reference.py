"""Plain-PyTorch twins of the fused ops: the specification every Triton kernel is tested against.

All arithmetic is fp32 whatever the input dtype; outputs come back in the input dtype, losses in fp32.
Gradients are whatever autograd derives from these definitions.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # cross_entropy rows whose target is this give loss 0 and gradient 0 (as in F.cross_entropy)
SAMPLE_CHUNK = 2048  # columns per chunk of the hierarchical Gumbel-max draw (part of its definition, as the hash is)
CHUNK_NOISE_COLUMN = 1 << 30  # chunk k's Gumbel is the noise of column CHUNK_NOISE_COLUMN + k (no real column)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, dropout: float = 0.0, seed: torch.Tensor | None = None,
                   x_bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dimension with fp32 sums and statistics (x_bias, the
    bias of the matrix product x, and residual may be None).

    Dropout (probability `dropout`) keeps x[row, col] where `keyed_uniform(seed, row, col) >= dropout` (row: the flat
    row index over the leading dimensions) and scales it by 1 / (1 - dropout), in fp32; seed is a 0-d int64 tensor,
    needed only when dropout > 0. The output has x's dtype (not fp32 as torch's layer_norm gives under autocast), so
    under bf16 autocast the hidden state passed between layers is bf16, by design: half the memory traffic between
    layers. Each gradient comes back in its own input's dtype (an fp32 residual's stays fp32)."""
    h = x.float() if x_bias is None else x.float() + x_bias.float()
    if dropout > 0:
        h = _dropped(h, dropout, seed)
    if residual is not None:
        h = h + residual.float()
    return F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def dropout_keep(seed: torch.Tensor, shape: torch.Size, dropout: float) -> torch.Tensor:
    """The boolean keep mask of `add_layer_norm`'s dropout for a tensor of `shape`, on seed's device: kept where
    `keyed_uniform(seed, row, col) >= dropout`. The seed's low 32 bits are the hash key as they are (no mixing of the
    seed: `seed_key` mixes one per dropout site beforehand, `model.layers.dropout_sites`)."""
    if seed is None or seed.dim() != 0:
        raise ValueError("dropout needs a 0-d int64 seed tensor")
    hidden, device = shape[-1], seed.device
    rows = torch.arange(shape.numel() // max(hidden, 1), device=device)[:, None]
    threshold = float(np.float32(dropout))  # the kernel's fp32 probability (no tensor from the host: no sync)
    return (keyed_uniform(seed, rows, torch.arange(hidden, device=device)) >= threshold).view(shape)


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """x where `dropout_keep(seed, x.shape, p)` holds, times 1 / (1 - p) in fp32, else 0; in x's dtype."""
    return _dropped(x.float(), p, seed).to(x.dtype)


def _dropped(h: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    return torch.where(dropout_keep(seed, h.shape, p), h * dropout_scale(p), 0.0)


def dropout_scale(dropout: float) -> float:
    return 1.0 / (1.0 - dropout) if dropout < 1.0 else 0.0


MASKED_SCORE = -1e30  # an attention score where the key is padding: finite, so a row of padding only is uniform


def attention(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None, dropout: float = 0.0,
              seed: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head self-attention of the QKV product qkv (B, L, 3 * hidden), laid out [q | k | v] with heads
    side by side in each, -> the context (B, L, hidden), heads side by side, in qkv's dtype.

    softmax(q k^T / sqrt(head size)) v per head in fp32; a key whose key_mask (B, L) entry is 0 scores MASKED_SCORE
    (None: every key is real). Dropout on the probabilities keeps those that `dropout_keep(seed, (B, heads, L, L),
    dropout)` picks (row: (b * heads + head) * L + query, column: key) and scales them by 1 / (1 - dropout)."""
    batch, length, width = qkv.shape
    q, k, v = qkv.float().view(batch, length, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if key_mask is not None:
        scores = scores.masked_fill(key_mask[:, None, None, :] == 0, MASKED_SCORE)
    probs = scores.softmax(dim=-1)
    if dropout > 0:
        probs = _dropped(probs, dropout, seed)
    return (probs @ v).transpose(1, 2).reshape(batch, length, width // 3).to(qkv.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU of x + bias, bias broadcast over the last dimension."""
    return F.gelu(x.float() + bias.float()).to(x.dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy in fp32: logits (N, V), targets (N,) -> (N,); target -100 gives 0."""
    return F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=IGNORE_INDEX)


def cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           dloss: torch.Tensor) -> torch.Tensor:
    """The gradient of `cross_entropy` (N, V) in the logits dtype, from each row's fp32 log-sum-exp `lse`:
    (softmax - one_hot(target)) * dloss, zero in rows whose target is IGNORE_INDEX."""
    g = torch.where(targets != IGNORE_INDEX, dloss.float(), 0.0)[:, None]
    # a comparison, not indexing by the targets: static shapes, so inductor traces it into one pointwise kernel
    one_hot = torch.arange(logits.shape[-1], device=logits.device) == targets[:, None]
    return ((torch.exp(logits.float() - lse[:, None]) - one_hot.float()) * g).to(logits.dtype)


def cross_entropy_and_sample(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor, temperature: float,
                             sample_columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generator head's loss and draws for logits (N, V) and targets (N,): `cross_entropy` over all V columns (the
    only output with a gradient), and the `gumbel_sample` and plain argmax of the first `sample_columns` columns
    (long), which the Triton kernel finds in one pass over the logits (and a second over one chunk per row)."""
    loss = cross_entropy(logits, targets)
    drawn = logits.detach()[:, :sample_columns]
    return loss, gumbel_sample(drawn, seed, temperature), drawn.argmax(dim=-1)


def sigmoid_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-element binary cross-entropy with logits in fp32 (no gradient for labels)."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.detach().float(), reduction="none")


@torch.no_grad()
def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
              lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              grad_scale: torch.Tensor | None = None) -> None:
    """One in-place ElectraAdam step (no bias correction, decoupled weight decay), elementwise in fp32:

        g = grad * grad_scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p = p - lr (m / (sqrt(v) + eps) + weight_decay p)

    exp_avg (m) and exp_avg_sq (v) are fp32; param is stored back in its own dtype. grad_scale is a 0-d fp32
    tensor on param's device (None: 1), read there.
    """
    g = grad.float() if grad_scale is None else grad.float() * grad_scale
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    p = param.float()  # param itself when fp32
    if weight_decay:
        p.mul_(1.0 - lr * weight_decay)  # p - lr * (m / d + wd * p) == p * (1 - lr * wd) - lr * m / d
    p.addcdiv_(exp_avg, denom, value=-lr)
    if p is not param:
        param.copy_(p)


# Noise (Gumbel sampling, dropout masks, the masking plan) is a counter-based hash of (seed, row, col), so the Triton
# kernels (noise.py) reproduce it bit for bit. uint32 values are held as the bits of int32 tensors: products wrap
# modulo 2**32 as in the kernels, and each right shift masks off the sign bits it brings in. Pure pointwise int32 ops,
# so under torch.compile inductor fuses the hash into the kernel that uses it (a dropout mask costs a few integer
# operations per value there, inside the LayerNorm's kernel). The hash of a whole (rows, vocabulary) block is updated
# in place: with a fresh tensor per operation it took 3x longer on a CPU.
_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - (1 << 32)  # lowbias32's multipliers, the second as an int32
_GOLDEN = 0x9E3779B9 - (1 << 32)  # the seed's high half is mixed with it, as an int32


def _int32_bits(x: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 tensor, as int32 (well defined: no out-of-range conversion)."""
    return (((x & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32)


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' "lowbias32" integer hash (a bijection of uint32) of an int32 tensor's bits, in place."""
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_MUL1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_MUL2)
    return x.bitwise_xor_((x >> 16) & 0xFFFF)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """`mix32_` of an int32 copy of x (int64 indices below 2**31 keep their values)."""
    return mix32_(x.to(torch.int32, copy=True))


def hash_uniform(seed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """fp32 uniform noise in (0, 1) for integer index tensors rows, cols (broadcast together, values below 2**31)
    under a 0-d int64 seed.

    key = mix32(seed_lo ^ mix32(seed_hi ^ 0x9E3779B9)); h = mix32(mix32(key ^ mix32(row)) ^ mix32(col));
    u = ((h >> 8) | 1) * 2**-24 (h as uint32), an odd multiple of 2**-24 strictly inside (0, 1). The same on every
    device.
    """
    return _uniform(seed_key(seed), rows, mix32(cols))


def keyed_uniform(key: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`hash_uniform`'s noise under a key given as it is: the low 32 bits of the int64 tensor key (the dropout masks'
    noise; a key per site keeps each kernel that draws it from computing, or under torch.compile realizing in a kernel
    of its own, the seed's key)."""
    return _uniform(_int32_bits(key), rows, mix32(cols))


def seed_key(seed: torch.Tensor) -> torch.Tensor:
    """The int32 key of an int64 seed tensor (elementwise): mix32(seed_lo ^ mix32(seed_hi ^ 0x9E3779B9))."""
    seed = seed.to(torch.int64)
    return mix32_(_int32_bits(seed) ^ mix32_(_int32_bits(seed >> 32) ^ _GOLDEN))


def _uniform(key: torch.Tensor, rows: torch.Tensor, col_hash: torch.Tensor) -> torch.Tensor:
    """`hash_uniform` from the seed's key and mix32 of the columns (both loop-invariant in `gumbel_sample`)."""
    h = mix32_(mix32_(key ^ mix32(rows)) ^ col_hash)
    return ((h >> 8) & 0xFFFFFF).bitwise_or_(1).float().mul_(2.0 ** -24)


def _gumbel_(u: torch.Tensor) -> torch.Tensor:
    return u.log_().neg_().log_().neg_()


def gumbel_sample(logits: torch.Tensor, seed: torch.Tensor, temperature: float,
                  chunk_elements: int | None = None) -> torch.Tensor:
    """Hierarchical Gumbel-max sample per row of logits (..., V) in fp32 -> (...) long, z = logits / T.

    The columns fall in chunks of SAMPLE_CHUNK; chunk k scores logsumexp(z over the chunk) + gumbel(row,
    CHUNK_NOISE_COLUMN + k), the best chunk wins (the first on a tie; a NaN score wins), and the sample is that
    chunk's argmax(z + gumbel(row, col)); gumbel(row, col) = -log(-log(`hash_uniform(seed, flat row, col)`)). A chunk's
    max of Gumbel-perturbed values is its log-sum-exp plus one Gumbel, independent of where in the chunk it falls, so
    this draws from softmax(z) exactly as a Gumbel-max over every column does (the same draw when V <= SAMPLE_CHUNK),
    with per-column noise for one chunk per row.

    seed is a 0-d int64 tensor read on its device (no host sync). Rows go in groups of about chunk_elements values
    (default: 2**18 on a CPU, where the temporaries then stay in cache, 2**22 elsewhere).
    """
    flat = logits.detach().reshape(-1, logits.shape[-1])
    n, v = flat.shape
    device = flat.device
    chunks = max(1, -(-v // SAMPLE_CHUNK))
    width = min(SAMPLE_CHUNK, v)
    key = seed_key(seed.to(device))
    chunk_hash = mix32(CHUNK_NOISE_COLUMN + torch.arange(chunks, device=device))
    within = torch.arange(width, device=device)
    inv_t = 1.0 / temperature
    if chunk_elements is None:
        chunk_elements = 1 << 18 if device.type == "cpu" else 1 << 22
    step = max(1, chunk_elements // max(v, 1))
    out = torch.empty(n, dtype=torch.long, device=device)
    for start in range(0, n, step):
        rows = torch.arange(start, min(start + step, n), device=device)[:, None]
        z = F.pad(flat[start:start + step].float() * inv_t, (0, chunks * width - v), value=float("-inf"))
        scores = torch.logsumexp(z.view(len(rows), chunks, width), dim=-1) + _gumbel_(_uniform(key, rows, chunk_hash))
        cols = scores.argmax(dim=-1, keepdim=True) * width + within  # the winning chunk's columns
        noisy = z.gather(1, cols) + _gumbel_(_uniform(key, rows, mix32(cols)))
        out[start:start + step] = cols.gather(1, noisy.argmax(dim=-1, keepdim=True)).squeeze(1)
    return out.reshape(logits.shape[:-1])
