"""The Hugging Face baseline of the throughput benchmark, and the guard that it is a fair one.

`HFElectraPretraining` wires transformers' `ElectraForMaskedLM` (generator) and `ElectraForPreTraining`
(discriminator) the way the seed code (RC2020 electra_pytorch) does: one embeddings module shared by both
towers (the generator uses the discriminator's word, position and token-type embeddings and embedding
LayerNorm), the generator's output layer tied to the word embeddings, full-vocabulary generator logits on
every position, MLM cross-entropy on the masked slots, Gumbel-max sampling in fp32 on those slots, and
loss = mlm_weight x MLM + disc_weight x discriminator BCE over the non-pad tokens.

`check_same_loss` shows that this wiring and our `ElectraForPretraining` compute the same losses on the same
weights (ours exported with `export_hf_pair` and loaded into the HF models) and the same masked batch, the
discriminators fed the same corrupted input.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from electra_ds.config import ElectraConfig, max_predictions
from electra_ds.data.masking import MaskingPlan, mask_tokens


@dataclass
class HFOutput:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    disc_loss: torch.Tensor
    disc_input: torch.Tensor  # (B, L) the original with generator samples in the masked slots


class HFElectraPretraining(nn.Module):
    """transformers' generator + discriminator with tied embeddings and ELECTRA's loss."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, config: ElectraConfig) -> None:
        super().__init__()
        embeddings = discriminator.electra.embeddings
        generator.electra.embeddings = embeddings  # word, position, token-type tables and LayerNorm, shared
        generator.generator_lm_head.weight = embeddings.word_embeddings.weight
        self.generator, self.discriminator = generator, discriminator
        self.mlm_weight, self.disc_weight, self.temperature = config.mlm_weight, config.disc_weight, config.temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                plan: MaskingPlan, disc_input: torch.Tensor | None = None) -> HFOutput:
        """One pretraining forward pass; `disc_input` given = skip sampling and feed it to the discriminator."""
        gen_logits = self.generator(input_ids=plan.generator_input_ids, attention_mask=attention_mask,
                                    token_type_ids=token_type_ids).logits  # (B, L, V): the head on every position
        batch, slots = plan.masked_positions.shape
        rows = torch.arange(batch, device=input_ids.device)[:, None]
        logits = gen_logits[rows, plan.masked_positions].reshape(batch * slots, -1)
        weights = plan.masked_weights.reshape(-1)
        ce = F.cross_entropy(logits.float(), plan.masked_ids.reshape(-1), reduction="none")
        mlm_loss = (ce * weights).sum() / weights.sum().clamp_min(1.0)

        with torch.no_grad():
            if disc_input is None:
                uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float32)
                gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
                sampled = (logits.detach().float() / self.temperature + gumbel).argmax(-1).view(batch, slots)
                sampled = torch.where(plan.masked_weights > 0, sampled, plan.masked_ids)
                disc_input = input_ids.scatter(1, plan.masked_positions, sampled)
            labels = (disc_input != input_ids).float()

        disc_logits = self.discriminator(input_ids=disc_input, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids).logits
        real = attention_mask.float()
        bce = F.binary_cross_entropy_with_logits(disc_logits.float(), labels, reduction="none")
        disc_loss = (bce * real).sum() / real.sum().clamp_min(1.0)
        loss = self.mlm_weight * mlm_loss + self.disc_weight * disc_loss
        return HFOutput(loss, mlm_loss, disc_loss, disc_input)


def build_hf_pair(config: ElectraConfig) -> HFElectraPretraining:
    """Freshly initialised HF towers shaped like `config`, wired and tied (SDPA attention)."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    from electra_ds.model.hf import hf_config

    return HFElectraPretraining(ElectraForMaskedLM(hf_config(config, "generator")),
                                ElectraForPreTraining(hf_config(config, "discriminator")), config)


def load_hf_pair_modules(export_dir: str | Path, config: ElectraConfig) -> HFElectraPretraining:
    """The HF towers from an `export_hf_pair` directory, wired and tied."""
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    export_dir = Path(export_dir)
    return HFElectraPretraining(ElectraForMaskedLM.from_pretrained(export_dir / "generator"),
                                ElectraForPreTraining.from_pretrained(export_dir / "discriminator"), config)


def hf_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the seeds make them: no decay for biases and LayerNorm weights (shared ones once)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # named_parameters() lists a tied tensor once
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class LossCheck:
    ours_mlm: float
    hf_mlm: float
    ours_disc: float
    hf_disc: float
    ours_total: float
    hf_total: float

    @property
    def max_abs_diff(self) -> float:
        return max(abs(self.ours_mlm - self.hf_mlm), abs(self.ours_disc - self.hf_disc),
                   abs(self.ours_total - self.hf_total) / max(1.0, self.ours_total))


def check_same_loss(config: ElectraConfig, *, batch_size: int = 3, max_length: int = 32, seed: int = 0,
                    atol: float = 1e-4) -> LossCheck:
    """Same weights, same masked batch (some rows padded), same corrupted input for both discriminators:
    our model's MLM and discriminator losses must equal the HF wiring's (fp32, CPU, dropout off).
    Raises AssertionError naming the loss that differs; returns the numbers."""
    from electra_ds.model.electra import ElectraForPretraining
    from electra_ds.model.hf import export_hf_pair

    config = config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(seed)
    ours = ElectraForPretraining(config).eval()
    with torch.no_grad():  # wider than the init, so the losses sit far from their chance values
        for p in ours.parameters():
            p.normal_(0.0, 0.2, generator=g)
    specials = special_token_ids(config.vocab_size)
    input_ids, attention_mask = random_batch(config.vocab_size, batch_size, max_length, specials, g)
    pad_from = max_length // 2
    input_ids[0, pad_from - 1], input_ids[0, pad_from:], attention_mask[0, pad_from:] = specials["sep"], \
        specials["pad"], 0  # a padded row, so the masks are exercised too
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[1, max_length // 2:] = 1
    plan = mask_tokens(input_ids, attention_mask, mask_token_id=specials["mask"], special_ids=list(specials.values()),
                       vocab_size=config.vocab_size, max_predictions=max_predictions(max_length, 0.15), seed=seed)
    with torch.no_grad():
        out = ours(input_ids, attention_mask, token_type_ids, plan, torch.tensor(seed, dtype=torch.int64))
        with tempfile.TemporaryDirectory(prefix="electra_check_") as tmp, quiet_transformers():
            export_hf_pair(ours, tmp)
            hf = load_hf_pair_modules(tmp, config).eval()
        ref = hf(input_ids, attention_mask, token_type_ids, plan, disc_input=out.disc_input)
    check = LossCheck(float(out.mlm_loss), float(ref.mlm_loss), float(out.disc_loss), float(ref.disc_loss),
                      float(out.loss), float(ref.loss))
    assert check.max_abs_diff <= atol, (
        f"the HF baseline does not compute our losses: MLM {check.ours_mlm:.6f} (ours) vs {check.hf_mlm:.6f} (HF), "
        f"discriminator {check.ours_disc:.6f} vs {check.hf_disc:.6f}, total {check.ours_total:.6f} vs "
        f"{check.hf_total:.6f}; the comparison in benchmarks/throughput.py would not be like for like")
    return check


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars from transformers' save/load while the check runs."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """BERT uncased ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), or 0-4 for a small vocab."""
    if vocab_size > 1000:
        return {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    return {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def random_batch(vocab_size: int, batch_size: int, max_length: int, specials: dict[str, int],
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length rows [CLS] w1 ... wn [SEP] of random ordinary token ids, and an all-ones attention mask."""
    low = max(specials.values()) + 1
    input_ids = torch.randint(low, vocab_size, (batch_size, max_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = specials["cls"], specials["sep"]
    return input_ids, torch.ones_like(input_ids)
