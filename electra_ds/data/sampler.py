"""Dynamic segment sampler: random windows of the token cache, a pure function of (seed, step, rank, world).

Each sample is a window of ``max_length - 2`` tokens framed as ``[CLS] window [SEP]`` (padded with [PAD]
when the document is shorter). Its position is drawn afresh at every step: a document is picked with
probability proportional to its length, then a start uniformly among the positions where the window fits
in it, so over many draws the windows cover every document and never cross a document boundary. With
``pack=True`` windows are drawn from the shard's token stream instead and may span consecutive documents
(they still never cross a shard end). With ``two_segments=True`` the window (``max_length - 3`` tokens) is
split at a random point between a quarter and three quarters of its length into segments A and B:
``[CLS] A [SEP] B [SEP]`` with token types 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``; as in the
original ELECTRA data builder, 10% of the samples keep a single segment.

Step ``s`` draws one global batch of ``batch_size * world_size`` samples from a generator seeded by
``(seed, s)``; rank ``r`` takes rows ``r * batch_size`` to ``(r + 1) * batch_size``. So every rank gets the
same number of samples, nothing is replayed, resuming needs only the step, and the global batch of a step
does not depend on how it is split across ranks.
"""
from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import signal
import weakref
from collections.abc import Iterator

import numpy as np

from electra_ds.lifetime import exit_with

from .cache import TokenCache

log = logging.getLogger(__name__)

# What a terminal, a launcher or a cluster sends to stop a run.
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

SINGLE_SEGMENT_PROBABILITY = 0.1  # share of single-segment samples in two-segment mode (original recipe)


class SegmentSampler:
    """Batches of ``input_ids``, ``attention_mask`` and ``token_type_ids``, each (batch_size, max_length) int64."""

    def __init__(self, cache: TokenCache, max_length: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, pack: bool = False, two_segments: bool = False, *,
                 max_positions: int | None = None) -> None:
        if max_length < (4 if two_segments else 3):
            raise ValueError(f"max_length={max_length} leaves no room for text beside [CLS]/[SEP]")
        if max_positions is not None and max_length > max_positions:
            raise ValueError(f"max_length={max_length} is longer than the model's {max_positions} positions "
                             "(max_position_embeddings); lower max_length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.cache, self.max_length, self.batch_size = cache, max_length, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pack, self.two_segments = pack, two_segments
        ids = cache.special_ids
        self.cls, self.sep, self.pad = ids["cls"], ids["sep"], ids["pad"]
        self.window = max_length - 2
        if pack:  # the units drawn from are whole shards
            self._unit_start = np.zeros(len(cache.shard_length), dtype=np.int64)
            self._unit_length = cache.shard_length
            self._unit_shard = np.arange(len(cache.shard_length), dtype=np.int32)
        else:
            self._unit_start, self._unit_length, self._unit_shard = cache.doc_start, cache.doc_length, cache.doc_shard
        self._cumulative = np.concatenate(([0], np.cumsum(self._unit_length)))
        self._cols = np.arange(max_length, dtype=np.int64)
        self._rows = np.arange(batch_size, dtype=np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of ``step`` for this rank (int64 arrays of shape (batch_size, max_length))."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        total = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, step])
        draws = rng.integers(0, self._cumulative[-1], size=total)
        fractions = rng.random((3, total))
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        unit = np.searchsorted(self._cumulative, draws[mine], side="right") - 1
        length = self._unit_length[unit]
        width = self.window  # text tokens the row can hold: one fewer with two segments (a third special)
        if self.two_segments:
            two = (fractions[2, mine] >= SINGLE_SEGMENT_PROBABILITY) & (np.minimum(length, self.window - 1) >= 2)
            width = self.window - two.astype(np.int64)
        span = np.maximum(length - width, 0) + 1  # starts where the text the row holds fits in the unit
        start = self._unit_start[unit] + (fractions[0, mine] * span).astype(np.int64)
        n = np.minimum(length, width)
        tokens = self._gather(self._unit_shard[unit], start)
        if self.two_segments:
            return self._two_segments(tokens, n, two, fractions[1, mine])
        return self._one_segment(tokens, n)

    def _gather(self, shard: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Tokens ``start .. start + window`` of each row's shard (clipped at the shard's end), (B, window)."""
        index = start[:, None] + self._cols[None, :self.window]
        if len(self.cache.shard_length) == 1:
            return np.take(self.cache.shard(0), index, mode="clip")
        order = np.argsort(shard, kind="stable")
        index, shard = index[order], shard[order]
        edges = [0, *(np.flatnonzero(np.diff(shard)) + 1).tolist(), len(shard)]
        shards = self.cache.shard
        grouped = np.empty(index.shape, dtype=self.cache.dtype)
        for s, a, b in zip(shard[edges[:-1]].tolist(), edges[:-1], edges[1:]):  # a gather per distinct shard
            np.take(shards(s), index[a:b], mode="clip", out=grouped[a:b])
        out = np.empty_like(grouped)
        out[order] = grouped
        return out

    def _one_segment(self, tokens: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
        cols = self._cols[None, :]
        end = (n + 1)[:, None]  # column of the closing [SEP]
        ids = np.empty((self.batch_size, self.max_length), dtype=np.int64)
        ids[:, 0] = self.cls
        ids[:, 1:-1] = tokens
        np.putmask(ids, cols >= end, self.pad)
        ids[self._rows, n + 1] = self.sep
        return {"input_ids": ids, "attention_mask": (cols <= end).astype(np.int64),
                "token_type_ids": np.zeros_like(ids)}

    def _two_segments(self, tokens: np.ndarray, m: np.ndarray, two: np.ndarray,
                      split_draw: np.ndarray) -> dict[str, np.ndarray]:
        """Rows of ``m`` text tokens, split into two segments where ``two``."""
        # first segment length k: A = tokens[:k], B = tokens[k:m]; without B, k = m
        k = np.where(two, np.clip(np.rint(m * (0.25 + 0.5 * split_draw)), 1, m - 1).astype(np.int64), m)
        cols = self._cols[None, :]
        end = m + 1 + two  # column of the closing [SEP]
        k_, end_ = k[:, None], end[:, None]
        ids = np.empty((self.batch_size, self.max_length), dtype=np.int64)
        ids[:, 0] = self.cls
        ids[:, 1:-1] = tokens  # column j holds token j - 1: right for segment A
        shifted = np.empty_like(ids)
        shifted[:, 1:] = ids[:, :-1]  # column j holds token j - 2: right for segment B
        np.copyto(ids, shifted, where=cols > k_)
        np.putmask(ids, cols > end_, self.pad)
        ids[self._rows, k + 1] = self.sep
        ids[self._rows, end] = self.sep
        return {"input_ids": ids, "attention_mask": (cols <= end_).astype(np.int64),
                "token_type_ids": ((cols > k_ + 1) & (cols <= end_)).astype(np.int64)}


class _StepBatches:
    """Map-style dataset: item ``step`` is the sampler's batch of that step as tensors."""

    def __init__(self, sampler: SegmentSampler) -> None:
        self.sampler = sampler

    def __getitem__(self, step: int):
        import torch

        return {k: torch.from_numpy(v) for k, v in self.sampler.batch(step).items()}


def batches(sampler: SegmentSampler, start_step: int, num_workers: int = 1,
            pin_memory: bool = False) -> LoaderBatches:
    """Endless iterator of tensor batches for steps ``start_step``, ``start_step + 1``, ... .

    A DataLoader runs :meth:`SegmentSampler.batch` in ``num_workers`` processes (0: in this process),
    in step order; ``pin_memory`` pins the tensors for fast, asynchronous copies to the GPU (ignored
    without CUDA). Close it (or let it be collected, or the process exit) to end the workers.
    """
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(_StepBatches(sampler), batch_size=None, sampler=itertools.count(start_step),
                        num_workers=num_workers, pin_memory=pin_memory and torch.cuda.is_available(),
                        prefetch_factor=4 if num_workers > 0 else None,
                        worker_init_fn=functools.partial(_init_worker, os.getpid()))
    # Registered (once) after torch's and multiprocessing's exit handlers, which the import above guarantees, so it
    # runs before them: torch's marks the interpreter as exiting, which makes the loader's shutdown a no-op, and
    # multiprocessing's would wait on workers that ignore its SIGTERM.
    atexit.unregister(_close_open_loaders)
    atexit.register(_close_open_loaders)
    return LoaderBatches(iter(loader))


class LoaderBatches:
    """A DataLoader iterator whose workers, which ignore SIGINT and SIGTERM (see `_init_worker`), end for certain.

    ``close()`` asks them to stop through the loader's queues, then SIGKILLs any still alive (a worker stuck in
    a batch: the loader's own fallback is SIGTERM). Collection and process exit close it too: at exit
    multiprocessing would otherwise SIGTERM and join each worker, forever.
    """

    def __init__(self, iterator: Iterator[dict]) -> None:
        self._iterator = iterator
        # A finalizer rather than __del__: it holds the iterator, so when the collector frees this object from a
        # reference cycle the iterator's queues are still open and can tell the workers to stop (from a freed
        # cycle, their finalizers may have closed them first: the workers would then wait out a 5 s join each).
        self._end = weakref.finalize(self, _end_workers, iterator)
        self._end.atexit = False  # `_close_open_loaders` does it, in the right order
        _OPEN.add(self)

    def __iter__(self) -> LoaderBatches:
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    @property
    def workers(self) -> list:
        return list(getattr(self._iterator, "_workers", []))

    def close(self) -> None:
        self._end()


def _end_workers(iterator: Iterator[dict]) -> None:
    workers = getattr(iterator, "_workers", [])  # none in a single-process iterator
    if not workers:
        return
    try:
        iterator._shutdown_workers()  # what the iterator's __del__ calls
    except RuntimeError as e:  # DataLoader's SIGCHLD check: a worker that died while exiting
        log.warning("a data loader worker failed while exiting (its batches were complete): %s", e)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


_OPEN: weakref.WeakSet[LoaderBatches] = weakref.WeakSet()


def _close_open_loaders() -> None:
    for loader in list(_OPEN):
        loader.close()


def _init_worker(trainer_pid: int, worker_id: int) -> None:
    """A loader worker ignores SIGINT and SIGTERM. A terminal, torchrun, deepspeed or Slurm signals every process:
    the training process then finishes its step and saves with its workers alive (a worker killed by such a signal
    made the loader raise mid-save). Ignoring, rather than blocking, covers every thread of the worker: a spawned or
    forkserver worker runs threads started before this function, and DataLoader's own SIGTERM handler, left in
    place, re-raises a signal from any process but the worker's parent with the default action (death).

    The worker ends when the training process does: `LoaderBatches.close` on a normal exit, and a watch on the
    training process otherwise. DataLoader's own watchdog checks the worker's parent, which under forkserver is
    the forkserver: it outlives a SIGKILLed training process while any worker holds it open."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    exit_with(trainer_pid)
