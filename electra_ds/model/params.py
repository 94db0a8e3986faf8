"""Parameters stored in a few flat buffers, addressed by Hugging Face names.

DeepSpeed's engine pays host time per parameter tensor and step (DESIGN.md section 4), so every weight
lives as a slice of one flat `nn.Parameter` per optimizer group ("decay", "no_decay", or per-layer groups
for fine-tuning). `views()` returns the named weights as views into those buffers; autograd sends their
gradients straight into the flat buffers' `.grad`. `forward_views()` is what a forward reads: the same, except that
under autocast every matrix-product operand comes from one cast of its whole buffer (see there).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

ALIGN = 64  # elements; keeps each view's start aligned for vectorised loads and matrix kernels


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "zeros" or "ones"
    block: str | None = None  # consecutive specs with the same block name are also viewable as one tensor
    matmul: bool = False  # passed to F.linear: autocast would cast it to its low precision at every use
    matmul_alias: str | None = None  # a name under which it is also served as a matrix-product operand (tied output)


@dataclass(frozen=True)
class Slot:
    group: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Chunk:
    """One piece of a group's `split_with_sizes`: a weight, a block of weights, or alignment padding."""

    name: str | None  # None for padding
    size: int
    members: list[str]  # weights viewed inside this chunk (one for a plain weight)


def default_group(name: str) -> str:
    """Weight decay everywhere except LayerNorm parameters and biases (the recipe's rule)."""
    return "no_decay" if name.endswith(".bias") or "LayerNorm" in name else "decay"


class FlatModule(nn.Module):
    """A module whose named weights are packed into one flat parameter per group.

    The flat parameters are registered on the module itself (not on a child), so ZeRO-3 gathers them in this
    module's forward pre-hook and re-gathers them for its backward. Views come from one `split_with_sizes` per
    group: its backward writes each group's gradient once (a `narrow` per weight would add a zero-filled
    buffer-sized tensor per weight in backward).
    """

    def init_flat(self, specs: Sequence[WeightSpec], group_fn: Callable[[str], str] | None = None,
                  initializer_range: float = 0.02, padding_rows: dict[str, int | None] | None = None) -> None:
        group_fn = group_fn or default_group
        matmul = {spec.name for spec in specs if spec.matmul}
        self.slots: dict[str, Slot] = {}
        chunks: dict[str, list[Chunk]] = {}
        for spec in specs:
            if spec.name in self.slots:
                raise ValueError(f"weight {spec.name!r} declared twice")
            group = group_fn(spec.name)
            group_chunks = chunks.setdefault(group, [])
            last = group_chunks[-1] if group_chunks else None
            extends = spec.block is not None and last is not None and last.name == spec.block
            if extends and self.slots[last.members[0]].shape[1:] != tuple(spec.shape[1:]):
                raise ValueError(f"block {spec.block!r}: {spec.name} has another trailing shape than its block")
            if extends and spec.matmul != (last.members[0] in matmul):
                raise ValueError(f"block {spec.block!r}: {spec.name} differs from its block in `matmul`")
            if spec.block is not None and not extends and any(c.name == spec.block for cs in chunks.values()
                                                               for c in cs):
                raise ValueError(f"block {spec.block!r}: its weights must be declared back to back in one group")
            if not extends and last is not None and last.size % ALIGN:  # pad the previous chunk to the alignment
                group_chunks.append(Chunk(None, ALIGN - last.size % ALIGN, []))
            slot = self.slots[spec.name] = Slot(group, tuple(spec.shape))
            if extends:
                last.size += slot.numel
                last.members.append(spec.name)
            else:
                group_chunks.append(Chunk(spec.block or spec.name, slot.numel, [spec.name]))
        sizes = {g: sum(c.size for c in cs) for g, cs in chunks.items()}
        self._chunks = chunks
        self.flat_names = {g: "flat_" + re.sub(r"\W", "_", g) for g in sizes}
        for g, n in sizes.items():
            self.register_parameter(self.flat_names[g], nn.Parameter(torch.zeros(n)))
        self._specs = list(specs)
        self._matmul = {c.name for cs in chunks.values() for c in cs if c.name is not None and c.members[0] in matmul}
        self._matmul_aliases = {spec.name: spec.matmul_alias for spec in specs if spec.matmul_alias}
        self._matmul_groups = {self.slots[name].group for name in [*matmul, *self._matmul_aliases]}
        self.reset_parameters(initializer_range, padding_rows or {})

    @torch.no_grad()
    def reset_parameters(self, initializer_range: float, padding_rows: dict[str, int | None]) -> None:
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
            if row is not None:  # HF configs may have "pad_token_id": null
                views[name][row].zero_()

    @property
    def flat(self) -> dict[str, nn.Parameter]:
        """Group name -> its flat parameter."""
        return {g: getattr(self, attr) for g, attr in self.flat_names.items()}

    def views(self, for_forward: bool = False, flats: dict[str, torch.Tensor] | None = None,
              matmul_flats: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weight name -> view into its flat buffer. `for_forward` adds what a forward reads besides: each block
        (e.g. fused QKV) as one tensor, and each weight under its `matmul_alias` name (a tied output layer).
        `flats` replaces the flat parameters (e.g. by copies in another dtype); groups it lacks are left out.
        `matmul_flats` (group -> a copy of its buffer) serves the matrix-product operands (specs marked `matmul`, and
        the `matmul_alias` names)."""
        out: dict[str, torch.Tensor] = {}
        flats = self.flat if flats is None else flats
        matmul_flats = matmul_flats or {}
        for group, chunks in self._chunks.items():
            if group not in flats:
                continue
            sizes = [c.size for c in chunks]
            parts = flats[group].split_with_sizes(sizes)
            matmul_parts = matmul_flats[group].split_with_sizes(sizes) if group in matmul_flats else parts
            for chunk, part, matmul_part in zip(chunks, parts, matmul_parts):
                if chunk.name is None:
                    continue
                if for_forward and chunk.name in self._matmul_aliases:
                    out[self._matmul_aliases[chunk.name]] = matmul_part.view(self.slots[chunk.name].shape)
                if chunk.name in self._matmul:
                    part = matmul_part
                is_block = chunk.members != [chunk.name]
                pieces = part.split_with_sizes([self.slots[m].numel for m in chunk.members]) if is_block else (part,)
                out.update({m: piece.view(self.slots[m].shape) for m, piece in zip(chunk.members, pieces)})
                if is_block and for_forward:
                    out[chunk.name] = part.view((-1,) + self.slots[chunk.members[0]].shape[1:])
        return out

    def forward_views(self) -> dict[str, torch.Tensor]:
        """`views(for_forward=True)`. Under autocast the matrix-product operands (specs marked
        `matmul`) are views of one cast of each flat buffer holding any to the autocast dtype: autocast would cast
        each operand at each use to the same values, so results do not change, but a cast or two replace hundreds."""
        flats = self.flat
        device_type = next(iter(flats.values())).device.type
        if not (self._matmul and torch.is_autocast_enabled(device_type)):
            return self.views(for_forward=True)
        dtype = torch.get_autocast_dtype(device_type)
        return self.views(for_forward=True, matmul_flats={g: flats[g].to(dtype) for g in self._matmul_groups})

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
