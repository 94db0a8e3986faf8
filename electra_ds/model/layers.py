"""ELECTRA's building blocks as pure functions of named weights (Hugging Face names, post-LN BERT layers)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from electra_ds import kernels
from electra_ds.config import ElectraConfig, TowerConfig
from electra_ds.model.params import WeightSpec

Weights = dict[str, torch.Tensor]


def linear_specs(name: str, n_out: int, n_in: int, bias_in_matmul: bool = True) -> list[WeightSpec]:
    """`bias_in_matmul=False` where the bias is added after the product (by `kernels.bias_gelu`, in fp32); else it is
    served in the products' dtype (as F.linear's bias, or as `kernels.add_layer_norm`'s x_bias)."""
    return [WeightSpec(f"{name}.weight", (n_out, n_in), "normal", matmul=True),
            WeightSpec(f"{name}.bias", (n_out,), "zeros", matmul=bias_in_matmul)]


def layer_norm_specs(name: str, size: int) -> list[WeightSpec]:
    return [WeightSpec(f"{name}.weight", (size,), "ones"), WeightSpec(f"{name}.bias", (size,), "zeros")]


def embedding_specs(prefix: str, config: ElectraConfig, output_layer: str | None = None) -> list[WeightSpec]:
    """`output_layer`: the name of a tied output layer's weight (the word embeddings, served as a matmul operand)."""
    e = config.embedding_size
    return [WeightSpec(f"{prefix}.word_embeddings.weight", (config.vocab_size, e), "normal",
                       matmul_alias=output_layer),
            WeightSpec(f"{prefix}.position_embeddings.weight", (config.max_position_embeddings, e), "normal"),
            WeightSpec(f"{prefix}.token_type_embeddings.weight", (config.type_vocab_size, e), "normal"),
            *layer_norm_specs(f"{prefix}.LayerNorm", e)]


def tower_specs(prefix: str, config: ElectraConfig, tower: TowerConfig) -> list[WeightSpec]:
    """Weights of `ElectraModel` minus its embeddings: the projection (if any) and the encoder layers.

    Q, K and V weights (and biases) form blocks `...attention.self.qkv.weight/.bias`: one matrix product serves all
    three.
    """
    h, f = tower.hidden_size, tower.intermediate_size
    specs = []
    if config.embedding_size != h:
        specs += linear_specs(f"{prefix}.embeddings_project", h, config.embedding_size)
    for i in range(tower.num_hidden_layers):
        layer = f"{prefix}.encoder.layer.{i}"
        qkv = [f"{layer}.attention.self.{n}" for n in ("query", "key", "value")]
        block = f"{layer}.attention.self.qkv"
        specs += [WeightSpec(f"{n}.weight", (h, h), "normal", f"{block}.weight", matmul=True) for n in qkv]
        specs += [WeightSpec(f"{n}.bias", (h,), "zeros", f"{block}.bias", matmul=True) for n in qkv]
        specs += linear_specs(f"{layer}.attention.output.dense", h, h)
        specs += layer_norm_specs(f"{layer}.attention.output.LayerNorm", h)
        specs += linear_specs(f"{layer}.intermediate.dense", f, h, bias_in_matmul=False)
        specs += linear_specs(f"{layer}.output.dense", h, f)
        specs += layer_norm_specs(f"{layer}.output.LayerNorm", h)
    return specs


def forward_seed(training: bool, device: torch.device, seed: torch.Tensor | None = None) -> torch.Tensor | None:
    """A forward's noise seed: None outside training (no dropout); in training `seed`, or one drawn from torch's
    generator on `device` when that is None."""
    if not training:
        return None
    return torch.randint(2**62, (), device=device) if seed is None else seed


def dropout_sites(seed: torch.Tensor | None, first: int, count: int = 1) -> torch.Tensor | None:
    """The dropout seeds of sites first .. first + count - 1 (below 2**21) under `seed` (a forward's 0-d int64 seed,
    below 2**62), as one (count,) int64 tensor (None stays None): the key (`reference.seed_key`) of the seed with the
    site number in bits 40 and up, so each site's masks differ from the other sites'. The dropout ops use a seed's
    low 32 bits as their hash key (`reference.keyed_uniform`), so the keys are mixed here, all in one op: under
    torch.compile a key per site took a one-value kernel each, in the forward and again in the backward."""
    if seed is None:
        return None
    sites = torch.arange(first, first + count, device=seed.device)
    return kernels.reference.seed_key(seed ^ (sites << 40)).to(torch.int64)


def embed(w: Weights, prefix: str, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
          config: ElectraConfig, dropout_seeds: torch.Tensor | None) -> torch.Tensor:
    """Word + token-type + position embeddings (positions start at 0), LayerNorm, dropout (under the first of the
    tower's site seeds `dropout_seeds`, `dropout_sites`; None: no dropout, as in evaluation)."""
    length = input_ids.shape[1]
    if length > config.max_position_embeddings:
        raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                         f"{config.max_position_embeddings}")
    x = F.embedding(input_ids, w[f"{prefix}.word_embeddings.weight"])
    types = w[f"{prefix}.token_type_embeddings.weight"]
    x = x + (types[0] if token_type_ids is None else kernels.token_type_embedding(token_type_ids, types))
    x = x + w[f"{prefix}.position_embeddings.weight"][:length]
    x = kernels.add_layer_norm(x, None, w[f"{prefix}.LayerNorm.weight"], w[f"{prefix}.LayerNorm.bias"],
                               config.layer_norm_eps)
    if dropout_seeds is None:
        return x
    return kernels.dropout(x, config.hidden_dropout_prob, dropout_seeds[0])


def encoder_layer(w: Weights, layer: str, h: torch.Tensor, length: int, mask: torch.Tensor | None,
                  tower: TowerConfig, config: ElectraConfig,
                  dropout_seeds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One post-LN BERT layer on the hidden states as rows, h (B * L, hidden), sequences of `length`; mask (B, L): 0
    for padding (None: none); `dropout_seeds`: the seeds of its attention probabilities' dropout and its two
    hidden-state dropouts (None: no dropout)."""
    training = dropout_seeds is not None
    probs_seed, attention_seed, output_seed = dropout_seeds if training else (None, None, None)
    qkv = F.linear(h, w[f"{layer}.attention.self.qkv.weight"], w[f"{layer}.attention.self.qkv.bias"])
    context = kernels.attention(qkv.view(-1, length, qkv.shape[-1]), tower.num_attention_heads, mask,
                                config.attention_probs_dropout_prob if training else 0.0, probs_seed)
    context = context.view(h.shape[0], -1)
    dropout = config.hidden_dropout_prob if training else 0.0
    h = dense_add_layer_norm(w, f"{layer}.attention.output", context, h, config.layer_norm_eps, dropout,
                             attention_seed)
    inter = kernels.bias_gelu(F.linear(h, w[f"{layer}.intermediate.dense.weight"]),
                              w[f"{layer}.intermediate.dense.bias"])
    return dense_add_layer_norm(w, f"{layer}.output", inter, h, config.layer_norm_eps, dropout, output_seed)


def dense_add_layer_norm(w: Weights, block: str, x: torch.Tensor, residual: torch.Tensor, eps: float,
                         dropout: float, seed: torch.Tensor | None) -> torch.Tensor:
    """LayerNorm(dropout(dense(x)) + residual) with `block`'s .dense and .LayerNorm weights. The dense's bias goes to
    the op that adds it cheaper (`kernels.layer_norm_is_opaque`): the same function, rounded differently."""
    weight, bias = w[f"{block}.dense.weight"], w[f"{block}.dense.bias"]
    norm = (w[f"{block}.LayerNorm.weight"], w[f"{block}.LayerNorm.bias"], eps, dropout, seed)
    if kernels.layer_norm_is_opaque(x, residual):
        return kernels.add_layer_norm(F.linear(x, weight), residual, *norm, x_bias=bias)
    return kernels.add_layer_norm(F.linear(x, weight, bias), residual, *norm)


def tower_forward(w: Weights, prefix: str, embeddings: torch.Tensor, mask: torch.Tensor | None,
                  tower: TowerConfig, config: ElectraConfig, dropout_seeds: torch.Tensor | None) -> torch.Tensor:
    """`ElectraModel` after the embeddings: optional projection to the tower's width, then the encoder.

    `w` must hold the QKV blocks (`forward_views()`). `dropout_seeds`: the tower's 3 L + 1 site seeds
    (`dropout_sites`; the first is the embeddings'), layer i's dropouts taking seeds 3i + 1 (attention
    probabilities), 3i + 2 and 3i + 3; None: no dropout."""
    batch, length = embeddings.shape[:2]
    # The layers work on rows (B * L, hidden): a hidden state's two gradients (from the next layer's matrix product
    # and from its residual path) then meet as mm + add without a view between, which inductor can make one addmm.
    h = embeddings.reshape(batch * length, -1)
    if f"{prefix}.embeddings_project.weight" in w:
        h = F.linear(h, w[f"{prefix}.embeddings_project.weight"], w[f"{prefix}.embeddings_project.bias"])
    for i in range(tower.num_hidden_layers):
        seeds = None if dropout_seeds is None else tuple(dropout_seeds[3 * i + j] for j in (1, 2, 3))
        h = encoder_layer(w, f"{prefix}.encoder.layer.{i}", h, length, mask, tower, config, seeds)
    return h.view(batch, length, -1)


def tower_sites(tower: TowerConfig) -> int:
    """How many dropout sites a tower has: its embeddings' and three per layer."""
    return 3 * tower.num_hidden_layers + 1
