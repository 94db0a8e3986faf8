"""Training metrics without per-step host syncs: device-side sums, read and reduced across ranks only when a
record is written; records go to OUT/metrics.jsonl (and wandb when enabled).

A record's keys: step, split ("train" or "eval"), loss, mlm_loss, disc_loss, gen_acc (generator top-1 on the
masked slots), disc_acc_replaced / disc_acc_original (discriminator accuracy on replaced and on original
tokens), replaced_frac (replaced tokens / real tokens), and for training also lr, loss_scale, grad_norm,
tokens_per_s (without a process's first `STARTUP_STEPS`), elapsed_s, flops, pfs_days, skipped_steps,
nonfinite_steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch

from electra_ds.files import atomic_write
from electra_ds.model.electra import STAT_NAMES

log = logging.getLogger(__name__)

LOSSES = ("loss", "mlm_loss", "disc_loss")


class DeviceMeter:
    """Sums of the losses and the model's `stats` over micro-batches, kept on the device.

    Slots: the 3 losses (only from finite steps), the count of finite steps, then the 7 `STAT_NAMES` sums.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4 + len(STAT_NAMES), dtype=torch.float64, device=device)
        self.micro_batches = 0

    def add(self, out) -> None:
        """One micro-batch's losses and stats, added as one row (a few small kernels, no host sync)."""
        losses = torch.stack([out.loss, out.mlm_loss, out.disc_loss]).detach().double()
        finite = torch.isfinite(losses[:1])
        self.sums += torch.cat([losses.where(finite, 0.0), finite.double(), out.stats.detach().double()])
        self.micro_batches += 1

    def _summed_over_ranks(self) -> tuple[list[float], int, int]:
        """(sums over every rank, micro-batches over every rank, world size)."""
        import torch.distributed as dist

        sums = torch.cat([self.sums, self.sums.new_tensor([self.micro_batches])])
        world = 1
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            world = dist.get_world_size()
        *values, micro = sums.tolist()
        return values, int(micro), world

    def read(self) -> dict[str, float]:
        """Sum over ranks, move to the host (the one sync), reset, and return the means and accuracies."""
        values, micro, _ = self._summed_over_ranks()
        self.sums.zero_()
        self.micro_batches = 0
        return summarize(values, micro)

    def state(self) -> dict[str, Any]:
        """The sums so far, over all ranks (every rank takes part): a checkpoint keeps them, so that a resume
        mid-interval logs what an uninterrupted run logs."""
        values, _, world = self._summed_over_ranks()
        return {"sums": values, "micro_batches": self.micro_batches, "world_size": world}

    def load_state(self, state: dict[str, Any], rank: int, world_size: int) -> bool:
        """Take up `state` if it comes from as many ranks (whether it did is returned): rank 0 holds the summed
        values (`read` adds the ranks up), the others start at zero."""
        if state.get("world_size") != world_size:
            return False
        self.micro_batches = int(state["micro_batches"])
        if rank == 0:
            self.sums.copy_(torch.tensor(state["sums"], dtype=self.sums.dtype))
        return True


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def summarize(values: list[float], micro_batches: int) -> dict[str, float]:
    finite = values[3]
    stats = dict(zip(STAT_NAMES, values[4:]))
    out = {name: (_ratio(values[i], finite) if finite else float("nan")) for i, name in enumerate(LOSSES)}
    out.update(gen_acc=_ratio(stats["gen_correct"], stats["gen_count"]),
               disc_acc_replaced=_ratio(stats["disc_replaced_correct"], stats["replaced_count"]),
               disc_acc_original=_ratio(stats["disc_original_correct"], stats["original_count"]),
               replaced_frac=_ratio(stats["replaced_count"], stats["token_count"]),
               nonfinite_steps=int(round(micro_batches - finite)))
    return out


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile:
    """OUT/metrics.jsonl, appended by rank 0 one record per line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def truncate_after(self, step: int) -> int:
        """On resume: drop records past the restored step, so the file reads as one uninterrupted run; returns how
        many were dropped."""
        if not self.path.is_file():
            return 0
        records = self.records()
        kept = [r for r in records if r.get("step", 0) <= step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return len(records) - len(kept)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line_no, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # e.g. a line cut short by a kill mid-write
                warnings.warn(f"{self.path}:{line_no}: not a JSON record; skipped")
        return records


class CollapseMonitor:
    """Warns when the discriminator stops telling replaced tokens from original ones.

    From `start_step` on (past warmup, and past the first 1000 steps, when calling every token "original" is a
    normal phase of training), if over the last `window` training records the accuracy on replaced tokens stays
    below `threshold` (the discriminator calls nearly everything original: the collapse RC2020 saw with generators
    of 0.75x the discriminator's width and more), it warns once.
    """

    def __init__(self, warmup_steps: int, window: int = 5, threshold: float = 0.05, min_steps: int = 1000) -> None:
        self.start_step, self.threshold = max(warmup_steps, min_steps), threshold
        self.recent: deque[float] = deque(maxlen=window)
        self.warned = False

    def update(self, step: int, record: dict[str, Any]) -> bool:
        """True when the run looks collapsed at this record (warns the first time)."""
        acc = record.get("disc_acc_replaced")
        if step <= self.start_step or acc is None or not math.isfinite(acc):
            return False
        self.recent.append(acc)
        collapsed = len(self.recent) == self.recent.maxlen and max(self.recent) < self.threshold
        if collapsed and not self.warned:
            self.warned = True
            log.warning("discriminator collapse? at step %d its accuracy on replaced tokens has stayed below %.2f "
                        "for %d logging intervals (original-token accuracy %.3f): it calls every token original. "
                        "A generator too large for the discriminator does this (RC2020: generator_size >= 0.75)",
                        step, self.threshold, len(self.recent), record.get("disc_acc_original") or 0.0)
        return collapsed


class Wandb:
    """wandb run under OUT (mode offline by default); does nothing when disabled or not installed."""

    def __init__(self, mode: str, out_dir: Path, project: str, name: str, config: dict, resume_id: str | None) -> None:
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            log.warning("wandb is not installed (pip install wandb); continuing without it")
            return
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), mode=mode, config=config,
                              id=resume_id, resume="allow" if resume_id else None)

    @property
    def id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            prefix = record.get("split", "train")
            self.run.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("step", "split")},
                         step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def format_line(record: dict[str, Any]) -> str:
    """One human-readable line for a record."""
    def f(key: str, fmt: str) -> str:
        v = record.get(key)
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    line = (f"[{record['split']}] step {record['step']}: loss {f('loss', '.4f')} (mlm {f('mlm_loss', '.4f')}, "
            f"disc {f('disc_loss', '.4f')}) gen_acc {f('gen_acc', '.3f')} disc_acc repl {f('disc_acc_replaced', '.3f')}"
            f" orig {f('disc_acc_original', '.3f')} replaced {f('replaced_frac', '.3f')}")
    if record["split"] == "train":
        line += (f" | lr {f('lr', '.2e')} grad_norm {f('grad_norm', '.3f')} scale {f('loss_scale', 'g')} "
                 f"{f('tokens_per_s', ',.0f')} tok/s {f('pfs_days', '.2e')} pfs-days")
    return line


__all__ = ["CollapseMonitor", "DeviceMeter", "MetricsFile", "Wandb", "format_line", "summarize"]
