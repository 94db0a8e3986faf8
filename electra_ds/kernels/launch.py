"""Launch-size helpers shared by the Triton kernels (plain Python, no triton import)."""
from __future__ import annotations

import dataclasses
import functools
import math

import torch


_ROW_TILE = 2048  # values per program tile of the row-wise kernels: BLOCK_M whole rows x BLOCK_H columns


def row_tile(hidden: int, op: str, values: int = _ROW_TILE) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_H) of a row-wise kernel: the row padded to a power of two, and as many rows as fit in a tile
    of `values` values. Rows wider than 8192 values are refused (named by `op`)."""
    block_h = 1 << max(0, hidden - 1).bit_length()
    if block_h > 8192:
        raise ValueError(f"{op}: hidden size {hidden} > 8192 is not supported by the Triton kernel; "
                         "use set_backend('torch')")
    return max(1, values // block_h), block_h


def tile_warps(values: int) -> int:
    """Warps for a program tile of `values` values: about 8 values per thread, 1 to 8 warps."""
    return max(1, min(8, values // 256))


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How a backward kernel that sums columns (LayerNorm's weight and bias gradients, the GELU's bias gradient)
    splits its rows. A program tile holds `tile` values (whole rows, or `columns` columns of each row where the kernel
    tiles columns too); `warps` per program (0: about 8 values per thread); `programs_per_sm` programs per
    multiprocessor, each walking a run of row tiles and writing one row of fp32 column-sum partials (0: one tile per
    program, the most parallel and the most partials); `stages` of Triton's software pipeline over that walk (2 or
    more: the next tiles' loads are in flight, through shared memory, while one tile is computed)."""
    tile: int = _ROW_TILE
    warps: int = 0
    programs_per_sm: int = 4
    columns: int = 0
    stages: int = 1

    def num_warps(self, values: int) -> int:
        return self.warps or tile_warps(values)


# The backward blockings in use; benchmarks/kernel_speed.py --row_configs times the candidates on a GPU.
LAYER_NORM_BACKWARD = Blocking()
GELU_BACKWARD = Blocking(tile=4096, warps=4, columns=128)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def row_partition(rows: int, block_m: int, device: torch.device, programs_per_sm: int = 4) -> tuple[int, int]:
    """How a reduction over `rows` splits into programs: (rows per program, a multiple of `block_m`; programs),
    `programs_per_sm` programs per streaming multiprocessor on CUDA (8 programs elsewhere; 0: one tile each)."""
    tiles = -(-rows // block_m)
    if programs_per_sm == 0:
        return block_m, max(1, tiles)
    slots = programs_per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    rows_per_program = max(1, -(-tiles // max(1, min(tiles, slots)))) * block_m
    return rows_per_program, max(1, -(-rows // rows_per_program))


@dataclasses.dataclass(frozen=True)
class RowLaunch:
    """A column-summing backward kernel's launch for one input: its program tile (block_m rows x block_cols columns),
    rows per program, programs along the rows (one row of partials each), warps per program and the pipeline stages
    of its walk over the row tiles."""
    block_m: int
    block_cols: int
    rows_per_program: int
    programs: int
    num_warps: int
    num_stages: int


def _row_launch(shape: torch.Size, block_m: int, block_cols: int, blocking: Blocking,
                device: torch.device) -> RowLaunch:
    rows = math.prod(shape[:-1]) if shape[-1] else 0
    rows_per_program, programs = row_partition(rows, block_m, device, blocking.programs_per_sm)
    return RowLaunch(block_m, block_cols, rows_per_program, programs, blocking.num_warps(block_m * block_cols),
                     blocking.stages)


def layer_norm_backward_launch(shape: torch.Size, device: torch.device) -> RowLaunch:
    """The LayerNorm backward's launch for an input of `shape` (..., H) under LAYER_NORM_BACKWARD: whole rows per
    tile."""
    block_m, block_h = row_tile(shape[-1], "add_layer_norm", LAYER_NORM_BACKWARD.tile)
    return _row_launch(shape, block_m, block_h, LAYER_NORM_BACKWARD, device)


def layer_norm_partials_shape(shape: torch.Size, device: torch.device, has_x_bias: bool) -> tuple[int, int, int]:
    """The shape of the LayerNorm backward's column-sum partials for an input of `shape` (..., H): (programs, 2 sums
    (the weight's and the bias's gradients) or 3 (and x_bias's), H)."""
    return layer_norm_backward_launch(shape, device).programs, 2 + has_x_bias, shape[-1]


def gelu_backward_launch(shape: torch.Size, device: torch.device) -> RowLaunch:
    """The GELU backward's launch for an input of `shape` (..., F) under GELU_BACKWARD: tiles of up to its `columns`
    columns (a power of two) and as many rows as fill its `tile` values."""
    block_f = 1 << max(0, shape[-1] - 1).bit_length()
    block_f = min(GELU_BACKWARD.columns or block_f, block_f)
    return _row_launch(shape, max(1, GELU_BACKWARD.tile // block_f), block_f, GELU_BACKWARD, device)


def gelu_partials_shape(shape: torch.Size, device: torch.device) -> tuple[int, int]:
    """The shape of the GELU backward's bias-gradient partials for an input of `shape` (..., F): (programs along the
    rows, F)."""
    return gelu_backward_launch(shape, device).programs, shape[-1]
