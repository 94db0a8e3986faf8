"""Parameters stored in a few flat buffers, addressed by Hugging Face names.

DeepSpeed's engine pays host time per parameter tensor and step (DESIGN.md section 4), so every weight
lives as a slice of one flat `nn.Parameter` per optimizer group ("decay", "no_decay", or per-layer groups
for fine-tuning). `views()` returns the named weights as views into those buffers; autograd sends their
gradients straight into the flat buffers' `.grad`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

ALIGN = 64  # elements; keeps each view's start aligned for vectorised loads and matrix kernels


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "zeros" or "ones"


@dataclass(frozen=True)
class Slot:
    group: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def default_group(name: str) -> str:
    """Weight decay everywhere except LayerNorm parameters and biases (the recipe's rule)."""
    return "no_decay" if name.endswith(".bias") or "LayerNorm" in name else "decay"


class FlatModule(nn.Module):
    """A module whose named weights are packed into one flat parameter per group.

    The flat parameters are registered on the module itself (not on a child), so ZeRO-3 gathers them in this
    module's forward pre-hook and re-gathers them for its backward.
    """

    def init_flat(self, specs: Sequence[WeightSpec], group_fn: Callable[[str], str] | None = None,
                  initializer_range: float = 0.02, padding_rows: dict[str, int] | None = None) -> None:
        group_fn = group_fn or default_group
        sizes: dict[str, int] = {}
        self.slots: dict[str, Slot] = {}
        for spec in specs:
            if spec.name in self.slots:
                raise ValueError(f"weight {spec.name!r} declared twice")
            group = group_fn(spec.name)
            offset = sizes.get(group, 0)
            slot = Slot(group, offset, tuple(spec.shape))
            self.slots[spec.name] = slot
            sizes[group] = offset + -(-slot.numel // ALIGN) * ALIGN
        self.flat_names = {g: "flat_" + re.sub(r"\W", "_", g) for g in sizes}
        for g, n in sizes.items():
            self.register_parameter(self.flat_names[g], nn.Parameter(torch.zeros(n)))
        self._specs = list(specs)
        self.reset_parameters(initializer_range, padding_rows or {})

    @torch.no_grad()
    def reset_parameters(self, initializer_range: float, padding_rows: dict[str, int]) -> None:
        views = self.views()
        for spec in self._specs:
            w = views[spec.name]
            if spec.init == "normal":
                w.normal_(0.0, initializer_range)
            elif spec.init == "ones":
                w.fill_(1.0)
            else:
                w.zero_()
        for name, row in padding_rows.items():
            views[name][row].zero_()

    @property
    def flat(self) -> dict[str, nn.Parameter]:
        """Group name -> its flat parameter."""
        return {g: getattr(self, attr) for g, attr in self.flat_names.items()}

    def views(self) -> dict[str, torch.Tensor]:
        flats = self.flat
        return {name: flats[s.group].narrow(0, s.offset, s.numel).view(s.shape) for name, s in self.slots.items()}

    def joined(self, views: dict[str, torch.Tensor], names: Iterable[str]) -> torch.Tensor:
        """Concatenate same-shaped weights along dim 0: a free view when they sit back to back (fused QKV)."""
        names = list(names)
        slots = [self.slots[n] for n in names]
        first = slots[0]
        contiguous = all(s.group == first.group and s.offset == first.offset + i * first.numel
                         and s.shape == first.shape for i, s in enumerate(slots))
        if contiguous:
            flat = self.flat[first.group]
            shape = (first.shape[0] * len(slots),) + first.shape[1:]
            return flat.narrow(0, first.offset, first.numel * len(slots)).view(shape)
        return torch.cat([views[n] for n in names], dim=0)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """One optimizer group per flat buffer; "no_decay" groups get weight decay 0."""
        return [{"params": [p], "weight_decay": 0.0 if g.endswith("no_decay") else weight_decay, "name": g}
                for g, p in self.flat.items()]

    @torch.no_grad()
    def load_named_weights(self, weights: dict[str, torch.Tensor], strict: bool = True, source: str = "state") -> None:
        """Copy named tensors into the flat buffers, checking names and shapes."""
        views = self.views()
        missing = [n for n in views if n not in weights]
        unexpected = [n for n in weights if n not in views]
        if strict and (missing or unexpected):
            raise KeyError(f"{source}: missing weights {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                           f"unexpected weights {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for name, tensor in weights.items():
            if name not in views:
                continue
            if tuple(tensor.shape) != tuple(views[name].shape):
                raise ValueError(f"{source}: weight {name} has shape {tuple(tensor.shape)}, the model expects "
                                 f"{tuple(views[name].shape)} (a model of another size?)")
            views[name].copy_(tensor)
