"""Parameters stored in a few flat buffers, addressed by Hugging Face names.

DeepSpeed's engine pays host time per parameter tensor and step (DESIGN.md section 4), so every weight
lives as a slice of one flat `nn.Parameter` per optimizer group ("decay", "no_decay", or per-layer groups
for fine-tuning). `views()` returns the named weights as views into those buffers; autograd sends their
gradients straight into the flat buffers' `.grad`. `forward_views()` is what a forward reads: the same, except that
under autocast every matrix-product operand comes from one cast per buffer (see there).

Within a buffer the weights read in full precision come first and the matrix-product operands after them, each
region in declaration order: a forward under autocast then splits the buffer into two regions, casts the second,
and splits each region into its weights, so every split output is used and the backward assembles the buffer's
gradient without a zero-filled piece per weight (`layout()` lists the offsets).
"""
from __future__ import annotations

import hashlib
import json
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


def _size(chunks: list[Chunk]) -> int:
    return sum(c.size for c in chunks)


def _pad(chunks: list[Chunk]) -> None:
    """Append alignment padding so that the next chunk starts at a multiple of ALIGN."""
    if _size(chunks) % ALIGN:
        chunks.append(Chunk(None, ALIGN - _size(chunks) % ALIGN, []))


def default_group(name: str) -> str:
    """Weight decay everywhere except LayerNorm parameters and biases (the recipe's rule)."""
    return "no_decay" if name.endswith(".bias") or "LayerNorm" in name else "decay"


class FlatModule(nn.Module):
    """A module whose named weights are packed into one flat parameter per group.

    The flat parameters are registered on the module itself (not on a child), so ZeRO-3 gathers them in this
    module's forward pre-hook and re-gathers them for its backward. Views come from `split_with_sizes` (a `narrow`
    per weight would add a zero-filled buffer-sized tensor per weight in backward).
    """

    def init_flat(self, specs: Sequence[WeightSpec], group_fn: Callable[[str], str] | None = None,
                  initializer_range: float = 0.02, padding_rows: dict[str, int | None] | None = None) -> None:
        group_fn = group_fn or default_group
        self.slots: dict[str, Slot] = {}
        # group -> (chunks read in full precision, matrix-product chunks): the buffer holds the first, then the second
        chunks: dict[str, tuple[list[Chunk], list[Chunk]]] = {}
        for spec in specs:
            if spec.name in self.slots:
                raise ValueError(f"weight {spec.name!r} declared twice")
            group = group_fn(spec.name)
            regions = chunks.setdefault(group, ([], []))
            if spec.block is not None and any(c.name == spec.block for c in regions[not spec.matmul]):
                raise ValueError(f"block {spec.block!r}: {spec.name} differs from its block in `matmul`")
            region = regions[spec.matmul]
            last = region[-1] if region else None
            extends = spec.block is not None and last is not None and last.name == spec.block
            if extends and self.slots[last.members[0]].shape[1:] != tuple(spec.shape[1:]):
                raise ValueError(f"block {spec.block!r}: {spec.name} has another trailing shape than its block")
            if spec.block is not None and not extends and any(c.name == spec.block for cs in chunks.values()
                                                               for region_chunks in cs for c in region_chunks):
                raise ValueError(f"block {spec.block!r}: its weights must be declared back to back in one group")
            if not extends:
                _pad(region)
            slot = self.slots[spec.name] = Slot(group, tuple(spec.shape))
            if extends:
                last.size += slot.numel
                last.members.append(spec.name)
            else:
                region.append(Chunk(spec.block or spec.name, slot.numel, [spec.name]))
        for plain, matmul in chunks.values():
            if matmul:
                _pad(plain)  # the matrix-product region starts aligned
        self._chunks = chunks
        self.flat_names = {g: "flat_" + re.sub(r"\W", "_", g) for g in chunks}
        for g, (plain, matmul) in chunks.items():
            self.register_parameter(self.flat_names[g], nn.Parameter(torch.zeros(_size(plain) + _size(matmul))))
        self._specs = list(specs)
        self._matmul_aliases = {spec.name: spec.matmul_alias for spec in specs if spec.matmul_alias}
        self._casts = any(matmul for _, matmul in chunks.values()) or bool(self._matmul_aliases)
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

    def layout(self) -> list[tuple[str, str, int, tuple[int, ...]]]:
        """(group, weight name, offset in the group's buffer, shape) of every weight, in buffer order."""
        out = []
        for group, (plain, matmul) in self._chunks.items():
            chunk_start = 0
            for chunk in plain + matmul:
                offset = chunk_start
                for name in chunk.members:  # none in a padding chunk
                    out.append((group, name, offset, self.slots[name].shape))
                    offset += self.slots[name].numel
                chunk_start += chunk.size
        return out

    def layout_fingerprint(self) -> str:
        """A short hash of `layout()`: flat buffers saved under one layout mean other weights under another."""
        return hashlib.sha256(json.dumps(self.layout()).encode()).hexdigest()[:16]

    def views(self, for_forward: bool = False, flats: dict[str, torch.Tensor] | None = None,
              matmul_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Weight name -> view into its flat buffer. `for_forward` adds what a forward reads besides: each block
        (e.g. fused QKV) as one tensor, and each weight under its `matmul_alias` name (a tied output layer).
        `flats` replaces the flat parameters (e.g. by their gradients); groups it lacks are left out.
        `matmul_dtype` serves the matrix-product operands (specs marked `matmul`, and the `matmul_alias` names) from
        one cast of each buffer's matrix-product region to that dtype."""
        out: dict[str, torch.Tensor] = {}
        flats = self.flat if flats is None else flats
        for group, (plain, matmul) in self._chunks.items():
            if group not in flats:
                continue
            flat = flats[group]
            if plain and matmul:
                plain_part, matmul_part = flat.split_with_sizes([_size(plain), _size(matmul)])
            else:
                plain_part, matmul_part = (flat, None) if plain else (None, flat)
            if matmul_part is not None and matmul_dtype is not None:
                matmul_part = matmul_part.to(matmul_dtype)
            # an alias in the full-precision region gets a cast of its own; the other region is cast already
            for region, part, alias_dtype in ((plain, plain_part, matmul_dtype), (matmul, matmul_part, None)):
                if not region:
                    continue
                for chunk, piece in zip(region, part.split_with_sizes([c.size for c in region])):
                    if chunk.name is not None:
                        self._view_chunk(out, chunk, piece, for_forward, alias_dtype)
        return out

    def _view_chunk(self, out: dict[str, torch.Tensor], chunk: Chunk, part: torch.Tensor, for_forward: bool,
                    alias_dtype: torch.dtype | None) -> None:
        """Add the views of one chunk's weights (and its block and alias, for a forward) to `out`."""
        shape = self.slots[chunk.members[0]].shape
        if for_forward and chunk.name in self._matmul_aliases:
            alias = part if alias_dtype is None else part.to(alias_dtype)
            out[self._matmul_aliases[chunk.name]] = alias.view(shape)
        is_block = chunk.members != [chunk.name]
        pieces = part.split_with_sizes([self.slots[m].numel for m in chunk.members]) if is_block else (part,)
        out.update({m: piece.view(self.slots[m].shape) for m, piece in zip(chunk.members, pieces)})
        if is_block and for_forward:
            out[chunk.name] = part.view((-1,) + shape[1:])

    def forward_views(self) -> dict[str, torch.Tensor]:
        """`views(for_forward=True)`. Under autocast the matrix-product operands (specs marked `matmul`) are views of
        one cast of their buffer's region to the autocast dtype, and each alias a cast of its weight: autocast would
        cast each operand at each use to the same values, so results do not change, but a few casts replace
        hundreds."""
        device_type = next(iter(self.flat.values())).device.type
        if not (self._casts and torch.is_autocast_enabled(device_type)):
            return self.views(for_forward=True)
        return self.views(for_forward=True, matmul_dtype=torch.get_autocast_dtype(device_type))

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
