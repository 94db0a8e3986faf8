"""Layer-wise learning-rate decay for fine-tuning (DESIGN.md section 3, point 8).

`group_fn` puts every classifier weight in a flat buffer named `<depth>_<decay|no_decay>`, where depth is
`head`, `layer_<l>` or `embeddings` (the embedding projection counts as embeddings, as in the original code).
With L encoder layers and decay d, the learning rate of each depth is

- rule "intended" (google-research/electra issue 51): head lr, layer l lr * d^(L - l), embeddings lr * d^(L + 1);
- rule "original" (the code behind the paper's numbers): one more power of d on every group but the head,
  i.e. layer l lr * d^(L + 1 - l), embeddings lr * d^(L + 2).
"""
from __future__ import annotations

import re

from electra_ds.model.params import default_group

RULES = ("intended", "original")
_LAYER = re.compile(r"^electra\.encoder\.layer\.(\d+)\.")


def depth_of(name: str) -> str:
    """`head`, `layer_<l>` or `embeddings` for a classifier weight name (HF naming)."""
    if name.startswith("classifier."):
        return "head"
    match = _LAYER.match(name)
    if match:
        return f"layer_{int(match.group(1))}"
    if name.startswith(("electra.embeddings.", "electra.embeddings_project.")):
        return "embeddings"
    raise ValueError(f"weight {name!r} belongs to no layer-wise lr group (expected classifier.*, "
                     f"electra.embeddings*, electra.encoder.layer.<l>.*)")


def group_fn(name: str) -> str:
    """The flat-buffer group of a classifier weight: its depth and whether it gets weight decay."""
    return f"{depth_of(name)}_{default_group(name)}"


def lr_scale(group: str, num_layers: int, decay: float, rule: str = "intended") -> float:
    """Multiplier of the base lr for a group named by `group_fn` (or a bare depth)."""
    if rule not in RULES:
        raise ValueError(f"unknown layer-wise lr decay rule {rule!r}; choose one of {RULES}")
    depth = re.sub(r"_(no_)?decay$", "", group)
    extra = 1 if rule == "original" else 0
    if depth == "head":
        return 1.0
    if depth == "embeddings":
        return decay ** (num_layers + 1 + extra)
    match = re.fullmatch(r"layer_(\d+)", depth)
    if not match or int(match.group(1)) >= num_layers:
        raise ValueError(f"group {group!r} is not head, embeddings or layer_<l> with l < {num_layers}")
    return decay ** (num_layers - int(match.group(1)) + extra)


def with_layer_lrs(param_groups: list[dict], *, lr: float, num_layers: int, decay: float,
                   rule: str = "intended") -> list[dict]:
    """Copies of optimizer param groups (each with a "name" from `group_fn`) with their own "lr"."""
    return [{**g, "lr": lr * lr_scale(g["name"], num_layers, decay, rule)} for g in param_groups]


__all__ = ["RULES", "depth_of", "group_fn", "lr_scale", "with_layer_lrs"]
