"""Masked-LM masking as pure tensor functions: static shapes, on the batch's device, no host sync.

The randomness is a counter-based hash of (seed, row, column) (`kernels.reference.hash_uniform`, the one the
Gumbel sampler uses), not a torch.Generator: the same seed gives the same masks on every device, and
`torch.compile(mask_tokens, fullgraph=True)` traces it whole, so it can run inside a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from electra_ds.kernels.reference import keyed_uniform, seed_key

DRAWS = 3  # independent uniform draws per row: slot scores, replacement choice, random token


class MaskingPlan(NamedTuple):
    generator_input_ids: torch.Tensor  # (B, L) the input with masked slots replaced
    masked_positions: torch.Tensor  # (B, P) positions of the masked slots
    masked_ids: torch.Tensor  # (B, P) original token ids at those positions
    masked_weights: torch.Tensor  # (B, P) float32: 1 for a real slot, 0 for a padding slot


def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *, mask_token_id: int,
                special_ids: Sequence[int], vocab_size: int, mlm_probability: float = 0.15,
                max_predictions: int = 19, mask_replace_prob: float = 0.85, random_replace_prob: float = 0.0,
                seed: torch.Tensor | int = 0) -> MaskingPlan:
    """Choose round(mlm_probability * n) tokens per row, n counting every non-padding token ([CLS] and [SEP]
    included, as google-research/electra counts), at least 1 and at most `max_predictions` or the maskable ones.

    Special tokens and padding are never chosen. Of the chosen slots, `mask_replace_prob` become [MASK],
    `random_replace_prob` a uniformly random token, the rest stay unchanged (ELECTRA: 0.85 / 0 / 0.15).
    Every row gets exactly `max_predictions` slots; unused ones have weight 0 and change nothing.
    `seed`: a 0-d int64 tensor (read on the device) or an int; the masks are a pure function of it and the batch.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    if mask_replace_prob < 0 or random_replace_prob < 0 or mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError(f"mask_replace_prob ({mask_replace_prob}) + random_replace_prob ({random_replace_prob}) "
                         "must be probabilities summing to at most 1")
    batch, length = input_ids.shape
    slots = min(max_predictions, length)
    device = input_ids.device

    maskable = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for special in special_ids:
        maskable = maskable & (input_ids != special)
    n_tokens = torch.full((batch,), length, device=device) if attention_mask is None else attention_mask.sum(dim=1)
    n_masked = (n_tokens.float() * mlm_probability).round().long().clamp(min=1, max=slots)
    n_masked = torch.minimum(n_masked, maskable.sum(dim=1))

    seed = torch.as_tensor(seed, dtype=torch.int64).to(device)
    rows = torch.arange(batch, device=device)[:, None] * DRAWS

    key = seed_key(seed).to(torch.int64)  # hash_uniform's key, mixed once (compiled: one kernel, not one per draw)

    def uniform(draw: int, cols: int) -> torch.Tensor:
        return keyed_uniform(key, rows + draw, torch.arange(cols, device=device)[None, :])

    # A uniformly random subset: the top-k of uniform scores, non-maskable tokens scored below every other.
    scores = uniform(0, length).masked_fill(~maskable, -1.0)
    positions = scores.topk(slots, dim=1, sorted=True).indices
    weights = (torch.arange(slots, device=device)[None, :] < n_masked[:, None]).float()
    original = input_ids.gather(1, positions)

    choice = uniform(1, slots)
    random_tokens = (uniform(2, slots) * vocab_size).long().clamp(max=vocab_size - 1)
    replaced = torch.where(choice < mask_replace_prob, torch.full_like(original, mask_token_id), original)
    use_random = (choice >= mask_replace_prob) & (choice < mask_replace_prob + random_replace_prob)
    replaced = torch.where(use_random, random_tokens, replaced)
    replaced = torch.where(weights > 0, replaced, original)
    return MaskingPlan(input_ids.scatter(1, positions, replaced), positions, original, weights)
