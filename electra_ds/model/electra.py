"""ELECTRA pretraining model: generator + discriminator sharing one set of embeddings.

Weights carry Hugging Face names under `discriminator.` (ElectraForPreTraining) and `generator.`
(ElectraForMaskedLM). The embeddings (word, position, token type, LayerNorm) exist once, under the
discriminator's names; the generator's embedding names and its output layer resolve to the same tensors
(`TIED`), so tying is structural and survives `.to()`, DeepSpeed wrapping, ZeRO and reloads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from electra_ds import kernels
from electra_ds.config import SITES_PER_TOWER, ElectraConfig
from electra_ds.data.masking import MaskingPlan
from electra_ds.model.layers import (dropout_sites, embed, embedding_specs, forward_seed, layer_norm_specs,
                                     linear_specs, tower_forward, tower_sites, tower_specs)
from electra_ds.model.params import FlatModule, WeightSpec

DISC, GEN = "discriminator", "generator"
TOWER_SITES = {GEN: SITES_PER_TOWER, DISC: 2 * SITES_PER_TOWER}  # a tower's sites: this (embeddings), + 1..3L
EMB = f"{DISC}.electra.embeddings"
LM_HEAD = f"{GEN}.generator_lm_head.weight"  # tied to the word embeddings
# The training forward pads the generator's logits with -inf columns to a multiple of this many: cuBLAS runs the
# 30522-wide output layer with slow kernels for rows that are not 16-byte aligned (an sm80 "align2" CUTLASS kernel
# on an H200). A -inf logit has no probability, is never sampled and gets no gradient.
VOCAB_MULTIPLE = 64
STAT_NAMES = ("gen_correct", "gen_count", "disc_replaced_correct", "replaced_count", "disc_original_correct",
              "original_count", "token_count")


def tied_names(config: ElectraConfig) -> dict[str, str]:
    """Generator weight name -> the discriminator weight it is."""
    tied = {f"{GEN}.electra.embeddings.{n}": f"{EMB}.{n}" for n in
            ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
             "LayerNorm.weight", "LayerNorm.bias")}
    tied[LM_HEAD] = f"{EMB}.word_embeddings.weight"
    return tied


def pretraining_specs(config: ElectraConfig) -> list[WeightSpec]:
    h, hg, e = config.hidden_size, config.generator.hidden_size, config.embedding_size
    return [*embedding_specs(EMB, config, output_layer=LM_HEAD),
            *tower_specs(f"{DISC}.electra", config, config.discriminator),
            *linear_specs(f"{DISC}.discriminator_predictions.dense", h, h, bias_in_matmul=False),
            *linear_specs(f"{DISC}.discriminator_predictions.dense_prediction", 1, h),
            *tower_specs(f"{GEN}.electra", config, config.generator),
            *linear_specs(f"{GEN}.generator_predictions.dense", e, hg, bias_in_matmul=False),
            *layer_norm_specs(f"{GEN}.generator_predictions.LayerNorm", e),
            WeightSpec(f"{GEN}.generator_lm_head.bias", (config.vocab_size,), "zeros", matmul=True)]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the vocabulary. CPU tensors only, and not while compiling: elsewhere reading the
    range back would be a host sync (or a graph break) per step."""
    if input_ids.device.type != "cpu" or torch.compiler.is_compiling() or not input_ids.numel():
        return
    top = int(input_ids.max())
    if top >= vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"token id {top} is outside the model's vocabulary of {vocab_size}: the data was "
                         "tokenized with another vocabulary (rebuild the cache or set vocab_size)")


@dataclass
class PretrainOutput:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    stats: torch.Tensor  # fp32 (7,), see STAT_NAMES: sums to accumulate on the device
    disc_logits: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L) bool: the discriminator's input differs from the original here
    disc_input: torch.Tensor  # (B, L) the original with generator samples in the masked slots


class ElectraForPretraining(FlatModule):
    def __init__(self, config: ElectraConfig, group_fn: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.tied = tied_names(config)
        self.init_flat(pretraining_specs(config), group_fn, config.initializer_range,
                       padding_rows={f"{EMB}.word_embeddings.weight": config.pad_token_id})

    # -- weights --------------------------------------------------------------------------------------------
    def named_weights(self) -> dict[str, torch.Tensor]:
        """Every weight by its Hugging Face name (tied names included), as views into the flat buffers."""
        w = self.views()
        w.update({alias: w[target] for alias, target in self.tied.items()})
        return w

    def load_named_weights(self, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Load weights by canonical name; tied aliases in `weights` are skipped (their target is loaded)."""
        canonical = {k: v for k, v in weights.items() if k not in self.tied}
        super().load_named_weights(canonical, strict=True, source=source)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _tower(self, w: dict, tower: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               token_type_ids: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
        """`seed`: the forward's noise seed in training (the tower's dropout sites derive from it), None otherwise."""
        cfg = self.config
        shape = cfg.discriminator if tower == DISC else cfg.generator
        sites = dropout_sites(seed, TOWER_SITES[tower], tower_sites(shape))
        x = embed(w, EMB, input_ids, token_type_ids, cfg, sites)
        return tower_forward(w, f"{tower}.electra", x, attention_mask, shape, cfg, sites)

    def _generator_head(self, w: dict, hidden: torch.Tensor, vocab_multiple: int = 1) -> torch.Tensor:
        """Vocabulary logits, with -inf columns appended up to a multiple of `vocab_multiple` (VOCAB_MULTIPLE)."""
        p = f"{GEN}.generator_predictions"
        h = kernels.bias_gelu(F.linear(hidden, w[f"{p}.dense.weight"]), w[f"{p}.dense.bias"])
        h = kernels.add_layer_norm(h, None, w[f"{p}.LayerNorm.weight"], w[f"{p}.LayerNorm.bias"],
                                   self.config.layer_norm_eps)
        weight, bias = w[LM_HEAD], w[f"{GEN}.generator_lm_head.bias"]  # the word embeddings, tied
        extra = -weight.shape[0] % vocab_multiple
        if extra:
            weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
            bias = torch.cat([bias, bias.new_full((extra,), float("-inf"))])
        return F.linear(h, weight, bias)

    def _discriminator_head(self, w: dict, hidden: torch.Tensor) -> torch.Tensor:
        p = f"{DISC}.discriminator_predictions"
        h = kernels.bias_gelu(F.linear(hidden, w[f"{p}.dense.weight"]), w[f"{p}.dense.bias"])
        return F.linear(h, w[f"{p}.dense_prediction.weight"], w[f"{p}.dense_prediction.bias"]).squeeze(-1)

    # -- public inference API -------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Discriminator hidden states (B, L, H)."""
        check_token_ids(input_ids, self.config.vocab_size)
        return self._tower(self.forward_views(), DISC, input_ids, attention_mask, token_type_ids,
                           forward_seed(self.training, input_ids.device))

    def discriminator_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                             token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replaced-token logits (B, L); > 0 means "replaced"."""
        check_token_ids(input_ids, self.config.vocab_size)
        w = self.forward_views()
        seed = forward_seed(self.training, input_ids.device)
        hidden = self._tower(w, DISC, input_ids, attention_mask, token_type_ids, seed)
        return self._discriminator_head(w, hidden)

    def generator_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         token_type_ids: torch.Tensor | None = None,
                         positions: torch.Tensor | None = None) -> torch.Tensor:
        """Vocabulary logits at `positions` (B, P) -> (B, P, V); all positions when None."""
        check_token_ids(input_ids, self.config.vocab_size)
        w = self.forward_views()
        seed = forward_seed(self.training, input_ids.device)
        hidden = self._tower(w, GEN, input_ids, attention_mask, token_type_ids, seed)
        if positions is not None:
            hidden = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self._generator_head(w, hidden)

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                token_type_ids: torch.Tensor | None, plan: MaskingPlan, seed: torch.Tensor) -> PretrainOutput:
        """One pretraining forward. `seed` (0-d int64, on any device: no host sync) is the step's noise: the Gumbel
        draws use it, and in training each dropout site a seed derived from it (`dropout_sites`), so the masks are
        the same with or without the Triton kernels and torch.compile."""
        cfg, w = self.config, self.forward_views()
        dropout_seed = forward_seed(self.training, input_ids.device, seed)
        check_token_ids(input_ids, cfg.vocab_size)  # the original: the towers' inputs are made from it
        batch, slots = plan.masked_positions.shape

        gen_hidden = self._tower(w, GEN, plan.generator_input_ids, attention_mask, token_type_ids, dropout_seed)
        gen_hidden = gen_hidden.gather(1, plan.masked_positions[..., None].expand(-1, -1, gen_hidden.shape[-1]))
        logits = self._generator_head(w, gen_hidden, VOCAB_MULTIPLE).view(batch * slots, -1)
        targets, weights = plan.masked_ids.reshape(-1), plan.masked_weights.reshape(-1)
        # Samples and the accuracy's argmax read the real columns only: a non-finite hidden state makes the padding
        # columns NaN (0 * inf), and a NaN column wins an argmax, which must be a token id.
        per_slot, sampled, predicted = kernels.cross_entropy_and_sample(logits, targets, seed, cfg.temperature,
                                                                        sample_columns=cfg.vocab_size)
        n_slots = weights.sum()
        mlm_loss = (per_slot * weights).sum() / n_slots.clamp_min(1.0)

        with torch.no_grad():
            sampled = torch.where(plan.masked_weights > 0, sampled.view(batch, slots), plan.masked_ids)
            disc_input = input_ids.scatter(1, plan.masked_positions, sampled)
            labels = disc_input != input_ids  # a sample equal to the original counts as real

        disc_hidden = self._tower(w, DISC, disc_input, attention_mask, token_type_ids, dropout_seed)
        disc_logits = self._discriminator_head(w, disc_hidden)
        real = torch.ones_like(disc_logits, dtype=torch.float32) if attention_mask is None else attention_mask.float()
        n_tokens = real.sum()
        disc_loss = (kernels.sigmoid_bce(disc_logits, labels) * real).sum() / n_tokens.clamp_min(1.0)
        loss = cfg.mlm_weight * mlm_loss + cfg.disc_weight * disc_loss

        with torch.no_grad():
            gen_correct = ((predicted == targets).float() * weights).sum()
            replaced = labels.float() * real
            original = (~labels).float() * real
            says_replaced = (disc_logits > 0).float()
            stats = torch.stack([gen_correct, n_slots, (says_replaced * replaced).sum(), replaced.sum(),
                                 ((1 - says_replaced) * original).sum(), original.sum(), n_tokens]).float()
        return PretrainOutput(loss, mlm_loss, disc_loss, stats, disc_logits, labels, disc_input)
