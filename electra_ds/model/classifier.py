"""Sequence classification / regression on the discriminator: [CLS] -> dropout -> linear (no pooler)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from electra_ds import kernels
from electra_ds.config import ElectraConfig
from electra_ds.model.electra import DISC, TOWER_SITES, check_token_ids
from electra_ds.model.layers import dropout_sites, embed, embedding_specs, forward_seed, \
    linear_specs, tower_forward, tower_sites, tower_specs
from electra_ds.model.params import FlatModule

PREFIX = "electra"


class ElectraClassifier(FlatModule):
    """The discriminator encoder (HF names `electra.*`) plus `classifier.weight` / `classifier.bias`."""

    def __init__(self, config: ElectraConfig, num_labels: int,
                 group_fn: Callable[[str], str] | None = None) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.config, self.num_labels = config, num_labels
        specs = [*embedding_specs(f"{PREFIX}.embeddings", config), *tower_specs(PREFIX, config, config.discriminator),
                 *linear_specs("classifier", num_labels, config.hidden_size)]
        self.init_flat(specs, group_fn, config.initializer_range,
                       padding_rows={f"{PREFIX}.embeddings.word_embeddings.weight": config.pad_token_id})
        with torch.no_grad():  # google-research/electra's head is a TF dense layer: Glorot-uniform weight, zero bias
            torch.nn.init.xavier_uniform_(self.views()["classifier.weight"])

    def named_weights(self) -> dict[str, torch.Tensor]:
        return self.views()

    def load_discriminator_weights(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Encoder weights from HF ElectraForPreTraining / ElectraModel names, or our pretraining model's
        `discriminator.` names. The classifier head keeps its fresh initialisation."""
        encoder = {}
        for name, tensor in state.items():
            name = name.removeprefix(f"{DISC}.")
            if not name.startswith(f"{PREFIX}."):
                name = f"{PREFIX}.{name}"  # ElectraModel state dicts have no "electra." prefix
            if name.startswith(f"{PREFIX}.") and name in self.slots:
                encoder[name] = tensor
        missing = [n for n in self.slots if n.startswith(f"{PREFIX}.") and n not in encoder]
        if missing:
            raise KeyError(f"{source}: not a discriminator checkpoint of this size; missing {missing[:5]}"
                           f"{'...' if len(missing) > 5 else ''}")
        super().load_named_weights(encoder, strict=False, source=source)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, seed: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, num_labels). In training, dropout masks derive from `seed` (a 0-d int64 tensor; None: drawn from
        torch's generator on the inputs' device), as in pretraining."""
        cfg, w = self.config, self.forward_views()
        check_token_ids(input_ids, cfg.vocab_size)
        seed = forward_seed(self.training, input_ids.device, seed)
        sites = dropout_sites(seed, TOWER_SITES[DISC], tower_sites(cfg.discriminator))
        x = embed(w, f"{PREFIX}.embeddings", input_ids, token_type_ids, cfg, sites)
        h = tower_forward(w, PREFIX, x, attention_mask, cfg.discriminator, cfg, sites)
        head_seed = dropout_sites(seed, 1)
        cls = kernels.dropout(h[:, 0], cfg.hidden_dropout_prob if self.training else 0.0,
                              None if head_seed is None else head_seed[0])
        return F.linear(cls, w["classifier.weight"], w["classifier.bias"])
