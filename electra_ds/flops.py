"""FLOP and parameter accounting for ELECTRA pretraining.

Two FLOP counts of one training step:

* `electra_step_flops` / `bert_step_flops` / `recipe_flops`: the ELECTRA paper's convention, as
  google-research/electra `flops_computation.py` counts it, so that our figures compare with the paper's
  tables. A matrix multiply costs 2 FLOP per multiply-add; embedding lookups are dense (a one-hot vector
  times the table); the MLM output head runs on 20/128 of the tokens; LayerNorm, GELU, softmax and dropout
  cost a fixed number of FLOPs per element; training = forward + backward with the backward pass counted
  as costing the same as the forward pass, so a step is 2 x forward. The one place we part from that
  script: it charges the attention-output LayerNorm 5 FLOPs per token instead of 5 per element (a typo
  there); we charge 5 per element, which moves the totals by under 0.1%.
* `executed_step_flops`: what our training step runs, for model FLOPs utilisation. Embedding lookups are
  gathers (no multiplies), the generator head runs on the `max_predictions` masked slots of each sequence
  (full-vocabulary logits there), the discriminator head on every token, and the backward pass costs
  2 x forward (a gradient for the inputs and one for the weights of every matrix multiply), so a step is
  3 x forward. Per-element costs are the paper's constants.

`count_parameters` counts parameters as our model lays them out (Hugging Face's ElectraForPreTraining /
ElectraForMaskedLM layout, the generator sharing the discriminator's embeddings).

`python -m electra_ds.flops` prints both counts for the recipes in `electra_ds.config.RECIPES` and for the
paper's BERT baselines.
"""
from __future__ import annotations

from dataclasses import dataclass

from electra_ds.config import RECIPES, ElectraConfig, TowerConfig, preset
from electra_ds.config import max_predictions as static_max_predictions

__all__ = ["PFS_DAY", "FlopCount", "electra_step_flops", "bert_step_flops", "recipe_flops",
           "executed_step_flops", "count_parameters", "bert_parameters", "flops_table"]

PFS_DAY = 8.64e19  # FLOPs in one petaflop/s-day: 1e15 FLOP/s x 86400 s

# FLOPs per element (google-research/electra flops_computation.py).
MATMUL_FLOPS = 2  # per multiply-add
DROPOUT_FLOPS = 4  # random number, compare, multiply by the mask, multiply by 1 / (1 - rate)
LAYER_NORM_FLOPS = 5  # mean (sum), variance (square and sum), bias (add), scale (multiply)
GELU_FLOPS = 8  # 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))
SOFTMAX_FLOPS = 5  # max, subtract, exp, sum, divide
ATTENTION_SCALE_FLOPS = 1  # scores / sqrt(head_size)
BIAS_FLOPS = 1
RESIDUAL_FLOPS = 1

PAPER_OUTPUT_FRACTION = 20 / 128  # share of tokens the paper runs the MLM output softmax on (0.15625)
PAPER_TRAIN_MULTIPLIER = 2  # forward + backward, backward counted as one forward
EXECUTED_TRAIN_MULTIPLIER = 3  # forward + backward, backward = input gradients + weight gradients

# The paper's BERT baselines (MLM only) next to the ELECTRA recipes: preset, batch, sequence length, steps.
BERT_RECIPES: dict[str, tuple[str, int, int, int]] = {
    "bert-small": ("small", 128, 128, 1_450_000),
    "bert-base": ("base", 256, 512, 1_000_000),
}


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of the discriminator and of the generator (paper convention); `total` is their sum."""

    discriminator: float
    generator: float

    @property
    def total(self) -> float:
        return self.discriminator + self.generator

    @property
    def pfs_days(self) -> float:
        return self.total / PFS_DAY

    def scaled(self, factor: float) -> "FlopCount":
        return FlopCount(self.discriminator * factor, self.generator * factor)


# ---------------------------------------------------------------------------------------------------------
# Forward FLOPs per token, one function per part of the network.
# ---------------------------------------------------------------------------------------------------------

def embedding_flops(config: ElectraConfig, tower: TowerConfig, seq_len: int, dense_lookup: bool) -> float:
    """Word + position + token-type embeddings, their sum, LayerNorm, dropout and the projection to the
    tower's width when embedding_size != hidden_size. A dense lookup multiplies a one-hot vector by the
    table; a gather costs nothing."""
    e, h = config.embedding_size, tower.hidden_size
    flops = 0.0
    if dense_lookup:
        flops += MATMUL_FLOPS * e * config.vocab_size  # word embedding
        flops += MATMUL_FLOPS * e * (seq_len + config.type_vocab_size)  # position and token-type embeddings
    flops += 2 * e  # add the three embeddings
    flops += LAYER_NORM_FLOPS * e + DROPOUT_FLOPS * e
    if e != h:
        flops += MATMUL_FLOPS * e * h + BIAS_FLOPS * h  # embeddings_project
    return flops


def self_attention_flops(tower: TowerConfig, seq_len: int) -> float:
    """Query/key/value projections, scores against every position, softmax, dropout, weighted values."""
    h, heads = tower.hidden_size, tower.num_attention_heads
    return (3 * (MATMUL_FLOPS * h * h + BIAS_FLOPS * h)  # query, key, value
            + MATMUL_FLOPS * h * seq_len  # query . key for every position (all heads together)
            + heads * seq_len * (ATTENTION_SCALE_FLOPS + SOFTMAX_FLOPS + DROPOUT_FLOPS)  # attention probs
            + MATMUL_FLOPS * h * seq_len)  # probabilities x values


def attention_output_flops(tower: TowerConfig) -> float:
    """Output projection, bias, dropout, residual add and LayerNorm after self-attention."""
    h = tower.hidden_size
    return (MATMUL_FLOPS * h * h + BIAS_FLOPS * h + DROPOUT_FLOPS * h + RESIDUAL_FLOPS * h
            + LAYER_NORM_FLOPS * h)


def feed_forward_flops(tower: TowerConfig) -> float:
    """Intermediate dense + bias + GELU, output dense + bias, dropout, residual add and LayerNorm."""
    h, i = tower.hidden_size, tower.intermediate_size
    return (MATMUL_FLOPS * h * i + BIAS_FLOPS * i + GELU_FLOPS * i
            + MATMUL_FLOPS * i * h + BIAS_FLOPS * h + DROPOUT_FLOPS * h + RESIDUAL_FLOPS * h
            + LAYER_NORM_FLOPS * h)


def layer_flops(tower: TowerConfig, seq_len: int) -> float:
    """One transformer layer."""
    return self_attention_flops(tower, seq_len) + attention_output_flops(tower) + feed_forward_flops(tower)


def mlm_head_flops(hidden_size: int, embedding_size: int, vocab_size: int) -> float:
    """Masked-LM head on one token: dense(H -> E) + bias, GELU, LayerNorm, logits against the (tied)
    embedding table, softmax and picking the target word."""
    h, e, v = hidden_size, embedding_size, vocab_size
    return (MATMUL_FLOPS * h * e + BIAS_FLOPS * e + GELU_FLOPS * e + LAYER_NORM_FLOPS * e
            + MATMUL_FLOPS * e * v + SOFTMAX_FLOPS * v + MATMUL_FLOPS * v)


def discriminator_head_flops(hidden_size: int) -> float:
    """Replaced-token head on one token: dense(H -> H) + bias, GELU, dense(H -> 1)."""
    h = hidden_size
    return MATMUL_FLOPS * h * h + BIAS_FLOPS * h + GELU_FLOPS * h + MATMUL_FLOPS * h


def encoder_flops(config: ElectraConfig, tower: TowerConfig, seq_len: int, dense_lookup: bool) -> float:
    """Forward FLOPs of embeddings + transformer layers for one sequence of `seq_len` tokens."""
    per_token = (embedding_flops(config, tower, seq_len, dense_lookup)
                 + tower.num_hidden_layers * layer_flops(tower, seq_len))
    return seq_len * per_token


# ---------------------------------------------------------------------------------------------------------
# Training-step FLOPs.
# ---------------------------------------------------------------------------------------------------------

def check_shape(config: ElectraConfig, batch_size: int, max_length: int) -> None:
    if batch_size < 1 or max_length < 1:
        raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size} and {max_length}")
    if max_length > config.max_position_embeddings:
        raise ValueError(f"max_length {max_length} exceeds the model's max_position_embeddings "
                         f"{config.max_position_embeddings}; lower max_length or raise max_position_embeddings")


def electra_step_flops(config: ElectraConfig, batch_size: int, max_length: int) -> FlopCount:
    """One ELECTRA training step in the paper's convention (see the module docstring)."""
    check_shape(config, batch_size, max_length)
    disc, gen = config.discriminator, config.generator
    output_tokens = PAPER_OUTPUT_FRACTION * max_length
    disc_forward = (encoder_flops(config, disc, max_length, dense_lookup=True)
                    + max_length * discriminator_head_flops(disc.hidden_size))
    gen_forward = (encoder_flops(config, gen, max_length, dense_lookup=True)
                   + output_tokens * mlm_head_flops(gen.hidden_size, config.embedding_size, config.vocab_size))
    return FlopCount(PAPER_TRAIN_MULTIPLIER * batch_size * disc_forward,
                     PAPER_TRAIN_MULTIPLIER * batch_size * gen_forward)


def bert_step_flops(config: ElectraConfig, batch_size: int, max_length: int) -> float:
    """One training step of an MLM-only (BERT) model shaped like `config`'s discriminator, in the paper's
    convention: the BERT baselines of the ELECTRA paper."""
    check_shape(config, batch_size, max_length)
    tower = config.discriminator
    output_tokens = PAPER_OUTPUT_FRACTION * max_length
    forward = (encoder_flops(config, tower, max_length, dense_lookup=True)
               + output_tokens * mlm_head_flops(tower.hidden_size, config.embedding_size, config.vocab_size))
    return PAPER_TRAIN_MULTIPLIER * batch_size * forward


def recipe_flops(config: ElectraConfig, batch_size: int, max_length: int, steps: int) -> FlopCount:
    """A whole ELECTRA pretraining run of `steps` steps, paper convention."""
    return electra_step_flops(config, batch_size, max_length).scaled(steps)


def executed_step_flops(config: ElectraConfig, batch_size: int, max_length: int, max_predictions: int) -> float:
    """FLOPs our training step executes (for MFU): gathers for embeddings, the generator head on the
    `max_predictions` masked slots of each sequence, the discriminator head on every token, 3 x forward."""
    check_shape(config, batch_size, max_length)
    if not 1 <= max_predictions <= max_length:
        raise ValueError(f"max_predictions must be in [1, max_length={max_length}], got {max_predictions}")
    disc, gen = config.discriminator, config.generator
    forward = (encoder_flops(config, disc, max_length, dense_lookup=False)
               + max_length * discriminator_head_flops(disc.hidden_size)
               + encoder_flops(config, gen, max_length, dense_lookup=False)
               + max_predictions * mlm_head_flops(gen.hidden_size, config.embedding_size, config.vocab_size))
    return EXECUTED_TRAIN_MULTIPLIER * batch_size * forward


# ---------------------------------------------------------------------------------------------------------
# Parameters, one function per part (Hugging Face's Electra layout).
# ---------------------------------------------------------------------------------------------------------

def linear_parameters(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def layer_norm_parameters(width: int) -> int:
    return 2 * width


def embedding_parameters(config: ElectraConfig) -> int:
    """Word, position and token-type tables and their LayerNorm (shared by both towers)."""
    e = config.embedding_size
    tables = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * e
    return tables + layer_norm_parameters(e)


def layer_parameters(tower: TowerConfig) -> int:
    h, i = tower.hidden_size, tower.intermediate_size
    attention = 4 * linear_parameters(h, h) + layer_norm_parameters(h)  # query, key, value, output
    feed_forward = linear_parameters(h, i) + linear_parameters(i, h) + layer_norm_parameters(h)
    return attention + feed_forward


def tower_parameters(config: ElectraConfig, tower: TowerConfig) -> int:
    """A tower's own parameters: embeddings_project (when embedding_size != hidden_size) and its layers."""
    project = linear_parameters(config.embedding_size, tower.hidden_size) \
        if config.embedding_size != tower.hidden_size else 0
    return project + tower.num_hidden_layers * layer_parameters(tower)


def mlm_head_parameters(config: ElectraConfig, hidden_size: int) -> int:
    """dense(H -> E), LayerNorm(E) and the output bias; the output weight is the tied word embedding."""
    e = config.embedding_size
    return linear_parameters(hidden_size, e) + layer_norm_parameters(e) + config.vocab_size


def discriminator_head_parameters(hidden_size: int) -> int:
    return linear_parameters(hidden_size, hidden_size) + linear_parameters(hidden_size, 1)


def count_parameters(config: ElectraConfig) -> dict[str, int]:
    """Parameters as our model lays them out.

    `shared_embeddings`: word/position/token-type tables + embedding LayerNorm, used by both towers.
    `discriminator`: the standalone discriminator (shared embeddings + its tower + its head), what
    Hugging Face's ElectraForPreTraining holds. `generator`: the generator's own parameters (its tower and
    MLM head, not the shared embeddings); ElectraForMaskedLM holds these plus the shared embeddings.
    `total`: every parameter of the pretraining model once (discriminator + generator).
    """
    shared = embedding_parameters(config)
    disc = config.discriminator
    discriminator = shared + tower_parameters(config, disc) + discriminator_head_parameters(disc.hidden_size)
    generator = tower_parameters(config, config.generator) + mlm_head_parameters(config,
                                                                                 config.generator.hidden_size)
    return {"shared_embeddings": shared, "discriminator": discriminator, "generator": generator,
            "total": discriminator + generator}


def bert_parameters(config: ElectraConfig) -> int:
    """An MLM-only model shaped like `config`'s discriminator: embeddings, tower and MLM head."""
    tower = config.discriminator
    return (embedding_parameters(config) + tower_parameters(config, tower)
            + mlm_head_parameters(config, tower.hidden_size))


# ---------------------------------------------------------------------------------------------------------
# The table.
# ---------------------------------------------------------------------------------------------------------

def millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def flops_table() -> str:
    """Markdown table of the ELECTRA recipes in `RECIPES` and the paper's BERT baselines."""
    lines = ["| model | batch x seq | steps | params (discriminator) | params (all) | FLOPs/step (paper) "
             "| total FLOPs (paper) | pfs-days | FLOPs/step (executed) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, recipe in RECIPES.items():
        config = preset(name)
        batch, length, steps = recipe["batch_size"], recipe["max_length"], recipe["max_steps"]
        params = count_parameters(config)
        step = electra_step_flops(config, batch, length)
        executed = executed_step_flops(config, batch, length,
                                       static_max_predictions(length, recipe["mlm_probability"]))
        lines.append(f"| electra-{name} | {batch} x {length} | {steps:,} | {millions(params['discriminator'])} "
                     f"| {millions(params['total'])} | {step.total:.3e} | {step.total * steps:.3e} "
                     f"| {step.total * steps / PFS_DAY:.4g} | {executed:.3e} |")
    for name, (preset_name, batch, length, steps) in BERT_RECIPES.items():
        config = preset(preset_name)
        step_total = bert_step_flops(config, batch, length)
        params = millions(bert_parameters(config))
        lines.append(f"| {name} | {batch} x {length} | {steps:,} | {params} | {params} | {step_total:.3e} "
                     f"| {step_total * steps:.3e} | {step_total * steps / PFS_DAY:.4g} | - |")
    return "\n".join(lines)


def main() -> None:
    print(flops_table())


if __name__ == "__main__":
    main()

