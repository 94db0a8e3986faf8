"""Triton multi-head self-attention on the QKV product, forward and backward (twin: reference.attention).

The kernels read q, k and v straight from the (B, L, 3 * hidden) product and write the context (B, L, hidden) and the
gradient (B, L, 3 * hidden) in the layouts of the matrix products around them: no head transposes and no assembly of
the three gradients. The dropout mask on the probabilities is reference.dropout_keep's hash, drawn again in the
backward from the seed: nothing but each row's softmax statistics (max and sum) is stored between the passes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .noise import UNALIGNED_SEED, dropout_key, keep
from .reference import MASKED_SCORE, dropout_scale

LOG2E = 1.4426950408889634  # scores are kept in log2 units, so the exponentials are exp2
_MASKED = tl.constexpr(MASKED_SCORE * LOG2E)

# Blocking: 64 x 64 tiles of queries x keys in half precision, so each tl.dot is a 64 x 64 x head-size tensor-core
# product (ELECTRA's 128-token sequences are two tiles each way); 32 x 32 in fp32, whose exact products are FMA loops
# that need more registers. The forward keeps a running max and sum (online softmax) over the key tiles. The backward
# recomputes the probabilities from each row's stored max and 1 / sum. Up to `one_pass` keys (half precision), one
# program per head holds all of a sequence's keys and walks its query tiles (of 32 rows: 64 spill in an sm_90 build):
# dK and dV accumulate, and each query tile's dQ is complete when the walk reaches it. Longer sequences take two
# kernels: one program per key tile walks the query tiles (dK, dV), one per query tile walks the key tiles (dQ).
# Either way no program adds into another's output (no atomics). Warps and pipeline stages per kernel: the sm_90
# builds' fewest registers with nothing spilled (`python tests/kernel_compile_check.py` prints them).
@dataclass(frozen=True)
class Blocking:
    block: int  # query and key tile of the forward and the two-kernel backward
    options: dict  # kernel ("fwd", "bwd_kv", "bwd_q", "bwd_one") -> launch options
    one_pass: int = 0  # longest sequence whose backward is the one-pass kernel (0: never)
    one_pass_block: int = 32  # that kernel's query tile


CONFIGS = {
    "half": Blocking(64, {"fwd": dict(num_warps=4, num_stages=2), "bwd_kv": dict(num_warps=8, num_stages=1),
                          "bwd_q": dict(num_warps=4, num_stages=2), "bwd_one": dict(num_warps=8, num_stages=1)},
                     one_pass=128, one_pass_block=32),
    "fp32": Blocking(32, {"fwd": dict(num_warps=8, num_stages=1), "bwd_kv": dict(num_warps=8, num_stages=1),
                          "bwd_q": dict(num_warps=4, num_stages=2)})}


@triton.jit
def _tile(Ptr, start, L, row_stride, d, D: tl.constexpr, BLOCK: tl.constexpr):
    rows = start + tl.arange(0, BLOCK)
    return tl.load(Ptr + rows[:, None] * row_stride + d[None, :], mask=(rows < L)[:, None] & (d < D)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(Ptr, rows, L, row_stride, d, D: tl.constexpr, values):
    tl.store(Ptr + rows[:, None] * row_stride + d[None, :], values.to(Ptr.dtype.element_ty),
             mask=(rows < L)[:, None] & (d < D)[None, :])


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation, exact fp32 products for fp32 tiles (no tf32); UPCAST (Triton's CPU interpreter,
    whose tl.dot does not support bf16) multiplies fp32 copies: the same products, as bf16 x bf16 is exact in fp32."""
    if UPCAST:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _scores(q, k, KeyMask, b, L, cols, qk_scale, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """A query tile's scores against a key tile in log2 units (padding keys MASKED_SCORE, keys past L -inf), and
    which keys are real."""
    s = _dot(q, tl.trans(k), UPCAST) * qk_scale
    real = cols < L
    if HAS_MASK:
        real &= tl.load(KeyMask + b * L + cols, mask=cols < L, other=0) != 0
    return tl.where(real[None, :], s, tl.where(cols < L, _MASKED, float("-inf"))[None, :]), real


@triton.jit(**UNALIGNED_SEED)
def _electra_attention_fwd(QKV, KeyMask, Seed, O, RowMax, RowScale, L, heads, qk_scale, p, drop_scale, D: tl.constexpr,
                           D_PAD: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                           UPCAST: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)  # grid axis 0 (up to 2**31 - 1 programs): batch x heads may exceed axis 1's 65535
    b, hidden = bh // heads, heads * D
    d = tl.arange(0, D_PAD)
    base = QKV + b.to(tl.int64) * L * 3 * hidden + (bh % heads) * D
    start_m = tl.program_id(1) * BLOCK
    rows = start_m + tl.arange(0, BLOCK)
    q = _tile(base, start_m, L, 3 * hidden, d, D, BLOCK)
    if DROPOUT:
        key = dropout_key(Seed)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], tl.float32)
    for start_n in range(0, L, BLOCK):
        cols = start_n + tl.arange(0, BLOCK)
        k = _tile(base + hidden, start_n, L, 3 * hidden, d, D, BLOCK)
        v = _tile(base + 2 * hidden, start_n, L, 3 * hidden, d, D, BLOCK)
        s, _ = _scores(q, k, KeyMask, b, L, cols, qk_scale, HAS_MASK, UPCAST)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, 1)
        if DROPOUT:
            prob = tl.where(keep(key, bh * L + rows, cols, p), prob * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _dot(prob.to(v.dtype), v, UPCAST)
        m_i = m_new
    _store_rows(O + b.to(tl.int64) * L * hidden + (bh % heads) * D, rows, L, hidden, d, D, acc / l_i[:, None])
    # max and 1 / sum, not their log-sum-exp: a row of padding keys (scores MASKED_SCORE) would lose log2(sum) in it
    tl.store(RowMax + bh.to(tl.int64) * L + rows, m_i, mask=rows < L)
    tl.store(RowScale + bh.to(tl.int64) * L + rows, 1.0 / l_i, mask=rows < L)


@triton.jit
def _query_tile(QKV, O, DO, RowMax, RowScale, bh, start_m, L, heads, d, D: tl.constexpr, BLOCK: tl.constexpr):
    """q, dO, each row's max and 1 / sum, and its delta = rowsum(dO * O) (the probabilities' share of dS) of a query
    tile."""
    b, hidden = bh // heads, heads * D
    rows = start_m + tl.arange(0, BLOCK)
    q = _tile(QKV + b.to(tl.int64) * L * 3 * hidden + (bh % heads) * D, start_m, L, 3 * hidden, d, D, BLOCK)
    out_base = b.to(tl.int64) * L * hidden + (bh % heads) * D
    do = _tile(DO + out_base, start_m, L, hidden, d, D, BLOCK)
    delta = tl.sum(do.to(tl.float32) * _tile(O + out_base, start_m, L, hidden, d, D, BLOCK).to(tl.float32), 1)
    row_max = tl.load(RowMax + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    row_scale = tl.load(RowScale + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)  # no probability past L
    return q, do, row_max, row_scale, delta


@triton.jit(**UNALIGNED_SEED)
def _electra_attention_bwd(QKV, KeyMask, Seed, O, DO, RowMax, RowScale, DQKV, L, heads, qk_scale, sm_scale, p,
                           drop_scale, D: tl.constexpr, D_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
                           DROPOUT: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                           FOR_Q: tl.constexpr, WITH_DQ: tl.constexpr):
    """FOR_Q: dQ of a query tile (BLOCK queries), walking the key tiles; else dK and dV of a key tile (BLOCK_N keys),
    walking the query tiles, and with WITH_DQ (the tile holds every key) each query tile's dQ too."""
    bh = tl.program_id(0)
    b, hidden = bh // heads, heads * D
    d = tl.arange(0, D_PAD)
    offset = b.to(tl.int64) * L * 3 * hidden + (bh % heads) * D
    if DROPOUT:
        key = dropout_key(Seed)
    if FOR_Q:
        start = tl.program_id(1) * BLOCK
        tile = start + tl.arange(0, BLOCK)
        q, do, row_max, row_scale, delta = _query_tile(QKV, O, DO, RowMax, RowScale, bh, start, L, heads, d, D, BLOCK)
        dq = tl.zeros([BLOCK, D_PAD], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            k = _tile(QKV + offset + hidden, start_n, L, 3 * hidden, d, D, BLOCK_N)
            v = _tile(QKV + offset + 2 * hidden, start_n, L, 3 * hidden, d, D, BLOCK_N)
            s, real = _scores(q, k, KeyMask, b, L, cols, qk_scale, HAS_MASK, UPCAST)
            prob = tl.exp2(s - row_max[:, None]) * row_scale[:, None]
            dprob = _dot(do, tl.trans(v), UPCAST)
            if DROPOUT:
                dprob = tl.where(keep(key, bh * L + tile, cols, p), dprob * drop_scale, 0.0)
            dscore = tl.where(real[None, :], prob * (dprob - delta[:, None]), 0.0)
            dq += _dot(dscore.to(k.dtype), k, UPCAST)
        _store_rows(DQKV + offset, tile, L, 3 * hidden, d, D, dq * sm_scale)
    else:
        start = tl.program_id(1) * BLOCK_N
        tile = start + tl.arange(0, BLOCK_N)  # this program's keys
        k = _tile(QKV + offset + hidden, start, L, 3 * hidden, d, D, BLOCK_N)
        v = _tile(QKV + offset + 2 * hidden, start, L, 3 * hidden, d, D, BLOCK_N)
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        for start_m in range(0, L, BLOCK):
            rows = start_m + tl.arange(0, BLOCK)
            q, do, row_max, row_scale, delta = _query_tile(QKV, O, DO, RowMax, RowScale, bh, start_m, L, heads, d, D,
                                                           BLOCK)
            s, real = _scores(q, k, KeyMask, b, L, tile, qk_scale, HAS_MASK, UPCAST)
            prob = tl.exp2(s - row_max[:, None]) * row_scale[:, None]
            kept = prob
            if DROPOUT:
                keeps = keep(key, bh * L + rows, tile, p)
                kept = tl.where(keeps, prob * drop_scale, 0.0)
            dv += _dot(tl.trans(kept.to(do.dtype)), do, UPCAST)
            dprob = _dot(do, tl.trans(v), UPCAST)
            if DROPOUT:
                dprob = tl.where(keeps, dprob * drop_scale, 0.0)
            dscore = tl.where(real[None, :], prob * (dprob - delta[:, None]), 0.0)
            dk += _dot(tl.trans(dscore.to(q.dtype)), q, UPCAST)
            if WITH_DQ:
                _store_rows(DQKV + offset, rows, L, 3 * hidden, d, D, _dot(dscore.to(k.dtype), k, UPCAST) * sm_scale)
        _store_rows(DQKV + offset + hidden, tile, L, 3 * hidden, d, D, dk * sm_scale)
        _store_rows(DQKV + offset + 2 * hidden, tile, L, 3 * hidden, d, D, dv)


def _launch(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None,
            dropout: float) -> tuple[Blocking, tuple, dict]:
    """(the blocking, the scalar arguments after the tensors: length, heads, scale in log2 units, scale; the
    constexprs but the backward's key tile)."""
    if qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton attention takes fp32, bf16 or fp16, not {qkv.dtype}; use set_backend('torch')")
    length, width = qkv.shape[1:]
    head_size = width // (3 * heads)
    sm_scale = head_size ** -0.5
    blocking = CONFIGS["fp32" if qkv.dtype == torch.float32 else "half"]
    constexprs = dict(D=head_size, D_PAD=max(16, triton.next_power_of_2(head_size)), HAS_MASK=key_mask is not None,
                      DROPOUT=dropout > 0, UPCAST=not qkv.is_cuda or os.environ.get("TRITON_INTERPRET") == "1",
                      BLOCK=blocking.block)
    return blocking, (length, heads, sm_scale * LOG2E, sm_scale), constexprs


def forward_pass(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None, dropout: float,
                 seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, L, hidden), the backward's softmax statistics (2, B * heads, L): each row's max score in log2
    units and 1 / its sum of exponentials)."""
    if dropout > 0 and seed is None:
        raise ValueError("attention dropout needs a seed (kernels.attention draws one when given None)")
    batch, length, width = qkv.shape
    out = qkv.new_empty(batch, length, width // 3)
    stats = torch.empty(2, batch * heads, length, dtype=torch.float32, device=qkv.device)
    if qkv.numel():
        blocking, scalars, constexprs = _launch(qkv, heads, key_mask, dropout)
        grid = (batch * heads, triton.cdiv(length, blocking.block))
        _electra_attention_fwd[grid](qkv, _or(key_mask, qkv), _or(seed, qkv), out, *stats, *scalars[:3], dropout,
                                     dropout_scale(dropout), **constexprs,
                                     **blocking.options["fwd"])  # sm_scale: backward only
    return out, stats


def backward_pass(dout: torch.Tensor, qkv: torch.Tensor, key_mask: torch.Tensor | None, seed: torch.Tensor | None,
                  out: torch.Tensor, stats: torch.Tensor, heads: int, dropout: float) -> torch.Tensor:
    """The gradient of `forward_pass`'s context with respect to qkv, (B, L, 3 * hidden)."""
    dqkv = torch.empty_like(qkv)
    if qkv.numel():
        blocking, scalars, constexprs = _launch(qkv, heads, key_mask, dropout)
        args = (qkv, _or(key_mask, qkv), _or(seed, qkv), out, dout.to(qkv.dtype).contiguous(), *stats, dqkv, *scalars,
                dropout, dropout_scale(dropout))
        batch, length = qkv.shape[:2]
        if length <= blocking.one_pass:
            one_pass = {**constexprs, "BLOCK": blocking.one_pass_block,
                        "BLOCK_N": max(16, triton.next_power_of_2(length)), "FOR_Q": False, "WITH_DQ": True}
            _electra_attention_bwd[(batch * heads, 1)](*args, **one_pass, **blocking.options["bwd_one"])
        else:
            tiles = (batch * heads, triton.cdiv(length, blocking.block))
            two_pass = {**constexprs, "BLOCK_N": blocking.block, "WITH_DQ": False}
            _electra_attention_bwd[tiles](*args, **two_pass, FOR_Q=False, **blocking.options["bwd_kv"])
            _electra_attention_bwd[tiles](*args, **two_pass, FOR_Q=True, **blocking.options["bwd_q"])
    return dqkv


def _or(t: torch.Tensor | None, stand_in: torch.Tensor) -> torch.Tensor:
    """A tensor argument the kernel reads only under a constexpr flag: any pointer serves when it is None."""
    return stand_in if t is None else t


class FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, heads, key_mask, dropout, seed):
        out, stats = forward_pass(qkv, heads, key_mask, dropout, seed)
        ctx.heads, ctx.dropout = heads, dropout
        ctx.save_for_backward(qkv, key_mask, seed, out, stats)
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, key_mask, seed, out, stats = ctx.saved_tensors
        return backward_pass(dout, qkv, key_mask, seed, out, stats, ctx.heads, ctx.dropout), None, None, None, None


def attention(qkv: torch.Tensor, heads: int, key_mask: torch.Tensor | None, dropout: float,
              seed: torch.Tensor | None) -> torch.Tensor:
    """Triton self-attention of a contiguous QKV product and key mask (kernels.attention makes them so); see
    reference.attention."""
    return FusedAttention.apply(qkv, heads, key_mask, float(dropout), seed)
