"""Checkpoints: DeepSpeed's engine state plus per-rank RNG, a manifest written last, and keep-last-K pruning.

Layout under `root` (OUT/checkpoints): one directory per checkpoint, `step00001234/`, holding DeepSpeed's
files (model, optimizer, scheduler and loss-scale state, `client_state`), our `rng_rank{r}.pt` per rank, and
`electra_ds_checkpoint.json`, written by rank 0 after every rank has finished writing. A directory without that
manifest, or whose files no longer have the sizes it records (a truncated copy, a half-synced disk), is not a
usable checkpoint: resuming falls back to the previous one with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from electra_ds.files import atomic_write, replacing

log = logging.getLogger(__name__)

MANIFEST = "electra_ds_checkpoint.json"
TAG = re.compile(r"^step(\d{8,})$")


class CheckpointError(RuntimeError):
    """No checkpoint could be restored although some exist."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and current CUDA device) generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    """Save, verify, restore and prune the engine checkpoints under `root`; every rank makes the same calls."""

    def __init__(self, root: str | os.PathLike, keep: int, rank: int, world_size: int) -> None:
        if keep < 1:
            raise ValueError(f"--keep_checkpoints must be >= 1, got {keep}")
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size

    # -- listing -----------------------------------------------------------------------------------------------
    def tags(self) -> list[tuple[int, str]]:
        """(step, tag) of every checkpoint directory, complete or not, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
        return sorted(found, reverse=True)

    def complete(self) -> list[tuple[int, str]]:
        return [(s, t) for s, t in self.tags() if (self.root / t / MANIFEST).is_file()]

    def problem(self, tag: str) -> str | None:
        """Why the checkpoint `tag` cannot be used, or None if its files are all there at the recorded sizes."""
        directory = self.root / tag
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"its manifest {directory / MANIFEST} is unreadable ({e})"
        for name, size in manifest.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                return f"{path} is missing"
            if path.stat().st_size != size:
                return f"{path} has {path.stat().st_size} bytes, the manifest recorded {size} (truncated?)"
        return None

    # -- saving ------------------------------------------------------------------------------------------------
    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        """All ranks: write the checkpoint for `step` (engine state, client_state, per-rank RNG), then prune."""
        tag = tag_for(step)
        directory = self.root / tag
        _barrier()
        if (directory / MANIFEST).is_file():
            return directory  # this step is already saved (e.g. the final save right after a periodic one)
        if self.rank == 0:
            if directory.exists():
                shutil.rmtree(directory)  # a leftover from a run killed while saving
            directory.mkdir(parents=True)
        _barrier()
        with replacing(directory / f"rng_rank{self.rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
        engine.save_checkpoint(str(self.root), tag=tag, client_state=dict(client_state, step=step))  # ends in a barrier
        if self.rank == 0:
            files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
                     if p.is_file() and p.name != MANIFEST}
            atomic_write(directory / MANIFEST, json.dumps({"step": step, "tag": tag, "world_size": self.world_size,
                                                           "time": time.time(), "files": files}, indent=2))
        _barrier()
        if self.rank == 0:
            self.prune()
        return directory

    def prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; drop older ones and incomplete leftovers."""
        kept = {t for _, t in self.complete()[: self.keep]}
        newest_kept = max((s for s, t in self.tags() if t in kept), default=-1)
        for step, tag in self.tags():
            if tag in kept:
                continue
            if (self.root / tag / MANIFEST).is_file() or step < newest_kept:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # -- restoring ---------------------------------------------------------------------------------------------
    def restore(self, engine, tag: str | None = None) -> tuple[int, dict[str, Any]] | None:
        """Load the newest usable checkpoint (or `tag`) into `engine` and this rank's RNG.

        Returns (step, client_state), or None when there is no checkpoint at all. A damaged checkpoint is skipped
        with a warning; if checkpoints exist but none loads, raises CheckpointError (never silently restarts).
        Every rank then checks that all restored the same step, whatever each found (no rank is left waiting).
        """
        try:
            found = self._restore(engine, tag)
        except CheckpointError:
            self._agree(-2)
            raise
        self._agree(found[0] if found else -1)
        return found

    def _restore(self, engine, tag: str | None) -> tuple[int, dict[str, Any]] | None:
        candidates = [(s, t) for s, t in self.complete() if tag is None or t == tag]
        if tag is not None and not candidates:
            raise CheckpointError(f"{self.root / tag}: no such complete checkpoint")
        if not candidates:
            leftovers = [t for _, t in self.tags()]
            if leftovers:
                log.warning("%s: ignoring incomplete checkpoint(s) %s (killed while saving)", self.root, leftovers)
            return None
        problems = []
        for step, name in candidates:
            issue = self.problem(name)
            if issue is None:
                issue, client_state = self._load(engine, name)
            if issue is None:
                return step, client_state
            problems.append(f"{name}: {issue}")
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", self.root / name, issue)
        raise CheckpointError(f"{self.root}: no usable checkpoint: " + "; ".join(problems))

    def _load(self, engine, tag: str) -> tuple[str | None, dict[str, Any]]:
        """(None, client_state) when loaded, else (why not, {})."""
        try:
            path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError) as e:
            return f"DeepSpeed could not load it ({type(e).__name__}: {str(e)[:300]})", {}
        if path is None:
            return "DeepSpeed found nothing to load", {}
        rng_file = self.root / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        else:
            log.warning("%s: no RNG state for rank %d (saved with another world size); dropout noise will differ "
                        "from an uninterrupted run", self.root / tag, self.rank)
        return None, client_state or {}

    def _agree(self, step: int) -> None:
        """Every rank must have restored the same step (-1: none found, -2: failed), or the run would silently mix
        states."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        from electra_ds.train.engine import device

        steps = torch.tensor([step, -step], dtype=torch.int64, device=device())
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if int(steps[0]) != step or int(-steps[1]) != step:
            raise CheckpointError(f"ranks restored different checkpoints (steps {int(-steps[1])}..{int(steps[0])}; "
                                  f"-1: none found, -2: failed); check that {self.root} is on a filesystem every "
                                  "node sees")


__all__ = ["CheckpointError", "CheckpointManager", "MANIFEST", "rng_state", "set_rng_state", "tag_for"]
