"""Model presets and the ELECTRA recipe's sizing rules.

`ElectraConfig` describes the discriminator and, through `generator_size` / `generator_layer_size`,
the generator. `TowerConfig` is one transformer tower's shape, derived from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


SITES_PER_TOWER = 1024  # dropout sites numbered per tower (model.layers.dropout_sites): its embeddings, 3 per layer
MAX_LAYERS = (SITES_PER_TOWER - 1) // 3


@dataclass(frozen=True)
class TowerConfig:
    """Shape of one transformer tower (generator or discriminator)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ElectraConfig:
    """Discriminator shape, shared embedding shape, generator sizing and the pretraining objective.

    Field names follow Hugging Face's `ElectraConfig` where one exists.
    """

    vocab_size: int = 30522
    embedding_size: int = 128
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int | None = 0  # its embedding row starts at zero; None: no such row
    # Generator = these fractions of the discriminator's width and depth (google-research/electra rounding).
    generator_size: float = 0.25
    generator_layer_size: float = 1.0
    # Explicit generator shape (e.g. Google's released generators); None = derived from the fractions above.
    generator_hidden_size: int | None = None
    generator_num_hidden_layers: int | None = None
    generator_num_attention_heads: int | None = None
    generator_intermediate_size: int | None = None
    # Objective.
    mlm_weight: float = 1.0
    disc_weight: float = 50.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                            f"{self.num_attention_heads}")
        if not 0.0 < self.generator_size <= 1.0:
            problems.append(f"generator_size must be in (0, 1]: a generator wider than the discriminator is "
                            f"not supported (got {self.generator_size})")
        if not 0.0 < self.generator_layer_size <= 1.0:
            problems.append(f"generator_layer_size must be in (0, 1] (got {self.generator_layer_size})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not problems:
            gen = self.generator
            if max(self.num_hidden_layers, gen.num_hidden_layers) > MAX_LAYERS:
                problems.append(f"at most {MAX_LAYERS} layers per tower (each tower numbers its dropout sites "
                                f"below {SITES_PER_TOWER}), got {max(self.num_hidden_layers, gen.num_hidden_layers)}")
            if gen.hidden_size > self.hidden_size:
                problems.append(f"generator hidden size {gen.hidden_size} is wider than the discriminator's "
                                f"{self.hidden_size}")
            if gen.hidden_size % gen.num_attention_heads:
                problems.append(f"generator hidden size {gen.hidden_size} is not divisible by its "
                                f"{gen.num_attention_heads} heads")
        if problems:
            raise ValueError("invalid ElectraConfig: " + "; ".join(problems))

    @property
    def discriminator(self) -> TowerConfig:
        return TowerConfig(self.hidden_size, self.num_hidden_layers, self.num_attention_heads,
                           self.intermediate_size)

    @property
    def generator(self) -> TowerConfig:
        """google-research/electra `get_generator_config`: width and depth scaled, FFN 4x, 64-wide heads."""
        hidden = self.generator_hidden_size or max(1, int(round(self.hidden_size * self.generator_size)))
        layers = self.generator_num_hidden_layers or max(1, int(round(self.num_hidden_layers *
                                                                      self.generator_layer_size)))
        heads = self.generator_num_attention_heads or max(1, hidden // 64)
        return TowerConfig(hidden, layers, heads, self.generator_intermediate_size or 4 * hidden)

    def replace(self, **overrides: Any) -> "ElectraConfig":
        check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ElectraConfig":
        check_fields(values)
        return cls(**values)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, max_position_embeddings=128, generator_size=0.5),
    "small": dict(),
    "base": dict(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, generator_size=1 / 3),
    "large": dict(embedding_size=1024, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, generator_size=0.25),
}

# The pretraining recipe that goes with each preset (DESIGN.md section 2).
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": dict(learning_rate=1e-3, batch_size=32, max_length=128, max_steps=300, warmup_steps=30,
                 mlm_probability=0.15),
    "small": dict(learning_rate=5e-4, batch_size=128, max_length=128, max_steps=1_000_000, warmup_steps=10_000,
                  mlm_probability=0.15),
    "base": dict(learning_rate=2e-4, batch_size=256, max_length=512, max_steps=766_000, warmup_steps=10_000,
                 mlm_probability=0.15),
    "large": dict(learning_rate=2e-4, batch_size=2048, max_length=512, max_steps=400_000, warmup_steps=10_000,
                  mlm_probability=0.25),
}


def check_fields(values: dict[str, Any]) -> None:
    known = {f.name for f in fields(ElectraConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown ElectraConfig field(s) {unknown}; known fields: {sorted(known)}")


def preset(name: str, **overrides: Any) -> ElectraConfig:
    """The named preset (`tiny`, `small`, `base`, `large`) with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    check_fields(overrides)
    return ElectraConfig(**{**PRESETS[name], **overrides})


def max_predictions(max_length: int, mlm_probability: float) -> int:
    """Static number of masked slots per sequence, as the original code sizes it (19 for 128 x 15%)."""
    return max(1, int((mlm_probability + 0.005) * max_length))


__all__ = ["ElectraConfig", "TowerConfig", "PRESETS", "RECIPES", "preset", "max_predictions"]
