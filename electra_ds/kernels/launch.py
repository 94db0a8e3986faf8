"""Launch-size helpers shared by the Triton kernels (plain Python, no triton import)."""
from __future__ import annotations

import functools
import math

import torch


_ROW_TILE = 2048  # values per program tile of the row-wise kernels: BLOCK_M whole rows x BLOCK_H columns


def row_tile(hidden: int, op: str) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_H) of a row-wise kernel: the row padded to a power of two, and as many rows as fit in the
    tile. Rows wider than 8192 values are refused (named by `op`)."""
    block_h = 1 << max(0, hidden - 1).bit_length()
    if block_h > 8192:
        raise ValueError(f"{op}: hidden size {hidden} > 8192 is not supported by the Triton kernel; "
                         "use set_backend('torch')")
    return max(1, _ROW_TILE // block_h), block_h


def tile_warps(values: int) -> int:
    """Warps for a program tile of `values` values: about 8 values per thread, 1 to 8 warps."""
    return max(1, min(8, values // 256))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_partition(rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """How a reduction over `rows` splits into programs: (rows per program, a multiple of `block_m`; programs),
    a few programs per streaming multiprocessor on CUDA, 8 elsewhere."""
    slots = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    tiles = -(-rows // block_m)
    rows_per_program = max(1, -(-tiles // max(1, min(tiles, slots)))) * block_m
    return rows_per_program, max(1, -(-rows // rows_per_program))


def layer_norm_partials_shape(shape: torch.Size, device: torch.device, has_x_bias: bool) -> tuple[int, int, int]:
    """The shape of the LayerNorm backward's column-sum partials for an input of `shape` (..., H): (programs, 2 sums
    (the weight's and the bias's gradients) or 3 (and x_bias's), H)."""
    h = shape[-1]
    rows = math.prod(shape[:-1]) if h else 0
    return row_partition(rows, row_tile(h, "add_layer_norm")[0], device)[1], 2 + has_x_bias, h
