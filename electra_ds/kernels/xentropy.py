"""Triton generator-head loss and sampling (twin: reference.cross_entropy_and_sample).

One forward pass over each row of logits gives its fp32 cross-entropy, its hierarchical Gumbel-max sample (noise that
the twin computes bit for bit) and its plain argmax. Per chunk of reference.SAMPLE_CHUNK columns the pass keeps a
log-sum-exp (one exp per logit) and draws one Gumbel; the best chunk is then read once more, with per-column noise.
Only the fp32 log-sum-exp per row is kept for the backward, which recomputes softmax from the logits and writes the
gradient straight in the logits dtype, so no (N, V) fp32 tensor is ever made. The sampling seed is read from a device
tensor inside the kernel: no host sync, and a CUDA graph replays with whatever seed the tensor holds at replay time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import tile_warps
from .noise import row_key, seed_key, uniform
from .reference import CHUNK_NOISE_COLUMN, IGNORE_INDEX, SAMPLE_CHUNK

_BWD_BLOCK = 4096


@triton.jit
def _keep_greater(best, best_col, z, c):
    # a NaN beats every number (+inf too) and is never beaten, as in torch.argmax
    better = (best == best) & ((z != z) | (z > best))
    return tl.where(better, z, best), tl.where(better, c, best_col)


@triton.jit
def _first_max_column(best, best_col, V):
    # the row's first NaN column, else its first maximal one, as torch.argmax picks
    nan = best != best
    first_nan = tl.min(tl.where(nan, best_col, V), axis=0)
    top = tl.max(tl.where(nan, float("-inf"), best), axis=0)
    first_top = tl.min(tl.where(best == top, best_col, V), axis=0)
    return tl.where(first_nan < V, first_nan, first_top).to(tl.int64)


@triton.jit
def _block_lse(z):
    # log-sum-exp of a block: NaN if a value is NaN, +inf if one is +inf, -inf if all are -inf
    mx = tl.max(z, axis=0)
    ref = tl.where(tl.abs(mx) == float("inf"), 0.0, mx)
    return ref + tl.log(tl.sum(tl.exp(z - ref), axis=0))


@triton.jit
def _gumbel(u):
    return -tl.log(-tl.log(u))


# Blocking: one program per row, sweeping the vocabulary in chunks of BLOCK (= SAMPLE_CHUNK, or the whole row when
# shorter) columns, 16 per thread. Block reductions give each chunk's log-sum-exp, kept in a vector of CHUNKS slots
# that the loss and the chunks' Gumbel scores share after the sweep; each lane keeps its best (value, column) of the
# plain logits for the argmax. The winning chunk is then read again for the per-column Gumbel-max, so the noise (two
# logs per value) is drawn for one chunk per row, not every column.
@triton.jit
def _electra_xentropy_sample_fwd(Logits, Targets, Seed, Loss, Lse, Sample, Argmax, V, S, stride, inv_t,
                                 IGNORE: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
                                 TEMPERED: tl.constexpr, NOISE_COLUMN: tl.constexpr):
    row = tl.program_id(0)
    base = Logits + row.to(tl.int64) * stride
    key = row_key(seed_key(Seed), row)
    cols = tl.arange(0, BLOCK)
    slots = tl.arange(0, CHUNKS)
    chunk_lse = tl.full([CHUNKS], float("-inf"), dtype=tl.float32)
    score_lse = tl.full([CHUNKS], float("-inf"), dtype=tl.float32)
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    top_col = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        sampled = c < S
        top, top_col = _keep_greater(top, top_col, tl.where(sampled, x, float("-inf")), c)
        here = slots == start // BLOCK
        lse_x = _block_lse(x)
        chunk_lse = tl.where(here, lse_x, chunk_lse)
        if TEMPERED:
            score_lse = tl.where(here, _block_lse(tl.where(sampled, x * inv_t, float("-inf"))), score_lse)
        elif start + BLOCK > S:  # a chunk that holds unsampled columns
            score_lse = tl.where(here, _block_lse(tl.where(sampled, x, float("-inf"))), score_lse)
        else:
            score_lse = tl.where(here, lse_x, score_lse)
    lse = _block_lse(chunk_lse)
    score = score_lse + _gumbel(uniform(key, NOISE_COLUMN + slots))
    c = _first_max_column(score, slots, CHUNKS).to(tl.int32) * BLOCK + cols
    x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
    noisy = tl.where(c < S, x * inv_t + _gumbel(uniform(key, c)), float("-inf"))
    target = tl.load(Targets + row)
    valid = target != IGNORE
    x_target = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(Loss + row, tl.where(valid, lse - x_target, 0.0))
    tl.store(Lse + row, lse)
    tl.store(Sample + row, _first_max_column(noisy, c, S))
    tl.store(Argmax + row, _first_max_column(top, top_col, S))


@triton.jit
def _electra_xentropy_bwd(Logits, Targets, Lse, DLoss, DLogits, V, stride, IGNORE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(Targets + row)
    g = tl.where(target != IGNORE, tl.load(DLoss + row), 0.0)
    lse = tl.load(Lse + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        c = start + cols
        x = tl.load(Logits + row * stride + c, mask=c < V, other=0.0).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)) * g
        tl.store(DLogits + row * V + c, d.to(DLogits.dtype.element_ty), mask=c < V)


def _rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (logits if logits.stride(1) == 1 else logits.contiguous()), targets.contiguous()


def forward_launch(vocab: int, temperature: float) -> dict:
    """The forward kernel's constexprs and launch options for rows of `vocab` columns."""
    block = min(SAMPLE_CHUNK, triton.next_power_of_2(vocab))  # the twin's chunks: SAMPLE_CHUNK columns, or one
    # fp fusion off: x * inv_t + noise must round like the twin's separate multiply and add
    return dict(IGNORE=IGNORE_INDEX, BLOCK=block, CHUNKS=triton.next_power_of_2(triton.cdiv(vocab, block)),
                TEMPERED=temperature != 1.0, NOISE_COLUMN=CHUNK_NOISE_COLUMN, num_warps=max(1, block // 512),
                enable_fp_fusion=False)


def forward_pass(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor, temperature: float,
                 sample_columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, log-sum-exp, sample, argmax) per row, from one kernel launch; no autograd."""
    logits, targets = _rows(logits.detach(), targets)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    sample = torch.empty(n, dtype=torch.long, device=logits.device)
    argmax = torch.empty_like(sample)
    if n:
        _electra_xentropy_sample_fwd[(n,)](logits, targets, seed.to(device=logits.device, dtype=torch.int64), loss,
                                           lse, sample, argmax, v, sample_columns, logits.stride(0), 1.0 / temperature,
                                           **forward_launch(v, temperature))
    return loss, lse, sample, argmax


def cross_entropy_backward(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                           dloss: torch.Tensor) -> torch.Tensor:
    """d loss / d logits (N, V) in the logits dtype, from the forward's log-sum-exp (reference.cross_entropy_backward)."""
    logits, targets = _rows(logits, targets)
    n, v = logits.shape
    dlogits = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n:
        block = min(_BWD_BLOCK, triton.next_power_of_2(v))
        _electra_xentropy_bwd[(n,)](logits, targets, lse, dloss.float().contiguous(), dlogits, v, logits.stride(0),
                                    IGNORE=IGNORE_INDEX, BLOCK=block, num_warps=tile_warps(block))
    return dlogits


class CrossEntropyAndSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, seed, temperature, sample_columns):
        loss, lse, sample, argmax = forward_pass(logits, targets, seed, temperature, sample_columns)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(sample, argmax)
        return loss, sample, argmax

    @staticmethod
    def backward(ctx, dloss, _dsample, _dargmax):
        logits, targets, lse = ctx.saved_tensors
        return cross_entropy_backward(logits, targets, lse, dloss), None, None, None, None


def cross_entropy_and_sample(logits: torch.Tensor, targets: torch.Tensor, seed: torch.Tensor, temperature: float,
                             sample_columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton (loss, sample, argmax) per row; see reference.cross_entropy_and_sample."""
    return CrossEntropyAndSample.apply(logits, targets, seed, temperature, sample_columns)
