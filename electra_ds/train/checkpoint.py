"""Checkpoints: DeepSpeed's engine state plus per-rank RNG, a manifest written last, and keep-last-K pruning.

Layout under `root` (OUT/checkpoints): one directory per checkpoint, `step00001234/`, holding DeepSpeed's
files (model, optimizer, scheduler and loss-scale state, `client_state`), our `rng_rank{r}.pt` per rank, and
`electra_ds_checkpoint.json`, written by rank 0 after every rank has finished writing. A directory without that
manifest, or whose files no longer have the sizes it records (a truncated copy, a half-synced disk), is not a
usable checkpoint: resuming falls back to the previous one with a warning. A checkpoint is written under
`step00001234.partial/` and renamed into place once complete, so it replaces an older one at that step atomically.

The manifest also records the settings a resume must keep (`CheckpointManager(settings=...)`: ZeRO stage,
precision, learning rate, weight decay, optimizer, the flat buffers' weight layout; and the world size under ZeRO); a
resume that changes one is refused with what to do instead. Manifests written before these were recorded are not
checked.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from electra_ds.files import atomic_write, move_into_place, remove_stale_temps, replacing
from electra_ds.train.engine import fp32_weights

log = logging.getLogger(__name__)

MANIFEST = "electra_ds_checkpoint.json"
TAG = re.compile(r"^step(\d{8,})$")
PARTIAL = ".partial"  # suffix of a checkpoint directory being written

_CONVERT = "or export its weights (python -m electra_ds.convert to-hf CHECKPOINT OUT_DIR) and start a new run"
# Settings a resume must keep as the checkpoint recorded them: (what to call it, why and what to do instead).
RESUME_SETTINGS = {
    "zero_stage": ("ZeRO stage", "DeepSpeed cannot load one ZeRO stage's optimizer state under another: resume "
                                 f"with the checkpoint's --deepspeed_config, {_CONVERT}"),
    "precision": ("precision", "DeepSpeed's fp16/bf16 engines keep their own weight copies and optimizer state, "
                               "unlike fp32 weights (fp32, or bf16/fp16 autocast): resume with the checkpoint's "
                               f"--deepspeed_config, {_CONVERT}"),
    "world_size": ("world size", "ZeRO partitions the optimizer state over the ranks: resume with the checkpoint's "
                                 f"number of processes, {_CONVERT}"),
    "learning_rate": ("--learning_rate", "the restored optimizer and schedule would keep the checkpoint's value: "
                                         "resume with it, or train with the new one in a new --output_dir"),
    "weight_decay": ("--weight_decay", "the restored optimizer would keep the checkpoint's value: resume with it, "
                                       "or train with the new one in a new --output_dir"),
    "optimizer": ("--optimizer", "the checkpoint holds that optimizer's state: resume with it, or train with the new "
                                 "one in a new --output_dir"),
    "flat_layout": ("weight layout", "this electra_ds version orders the weights in its flat buffers otherwise than "
                                     "the version that wrote the checkpoint: resume with that version, or export the "
                                     "weights with it (python -m electra_ds.convert to-hf CHECKPOINT OUT_DIR) and "
                                     "start a new run from the export"),
}


def check_layout(directory: Path, fingerprint: str) -> None:
    """Raise ValueError if the checkpoint in `directory` recorded a flat-buffer weight layout other than `fingerprint`
    (`FlatModule.layout_fingerprint`); a manifest without one (written before it was recorded) passes."""
    manifest = directory / MANIFEST
    recorded = json.loads(manifest.read_text()).get("flat_layout") if manifest.is_file() else None
    if recorded not in (None, fingerprint):
        raise ValueError(f"{directory}: weight layout {recorded}, this version's {fingerprint}: "
                         + RESUME_SETTINGS["flat_layout"][1])


def _comparable(setting: str, value: Any) -> Any:
    """What must match on resume: fp32 and autocast precisions all train fp32 weights with the same state."""
    if setting == "precision" and fp32_weights(str(value)):
        return "fp32 weights"
    return value


# What reading a damaged or unreadable checkpoint raises (torch.load, DeepSpeed's load_checkpoint).
UNREADABLE = (OSError, RuntimeError, ValueError, KeyError, EOFError, AssertionError, pickle.UnpicklingError)


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

    def __init__(self, root: str | os.PathLike, keep: int, rank: int, world_size: int,
                 settings: dict[str, Any] | None = None, read_only: bool = False) -> None:
        """`settings` (keys of RESUME_SETTINGS but world_size) go into every manifest written, and are compared
        with the manifest of the checkpoint restored. `read_only` (another run's checkpoints, to resume from):
        nothing under `root` changes; a save of that run killed while being moved into place stays for that run
        to finish, and save / prune / set_aside refuse."""
        if keep < 1:
            raise ValueError(f"--keep_checkpoints must be >= 1, got {keep}")
        self.root, self.keep, self.rank, self.world_size = Path(root), keep, rank, world_size
        self.read_only = read_only
        self.settings = dict(settings or {})
        self.held: str | None = None  # the tag this process last saved or restored: it holds this run's state
        self.unreadable: set[str] = set()  # complete checkpoints whose files did not load (`first_usable`)

    # -- listing -----------------------------------------------------------------------------------------------
    def tags(self) -> list[tuple[int, str]]:
        """(step, tag) of every checkpoint directory, complete or not, newest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p.name) for p in self.root.iterdir() if p.is_dir() and (m := TAG.match(p.name))]
        return sorted(found, reverse=True)

    def complete(self) -> list[tuple[int, str]]:
        return [(s, t) for s, t in self.tags() if (self.root / t / MANIFEST).is_file()]

    def sound(self) -> list[tuple[int, str]]:
        """(step, tag) of the complete checkpoints without a `problem`, newest first."""
        return [(s, t) for s, t in self.complete() if self.problem(t) is None]

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
        """All ranks: write the checkpoint for `step` (engine state, client_state, per-rank RNG), then prune.

        A no-op when this process already saved or restored that step (e.g. the final save right after a periodic
        one). Any other checkpoint at that step (damaged, or of another run) is replaced: the new one is written
        under `<tag>.partial` and renamed into place once its manifest is written.
        """
        self._writable()
        tag = tag_for(step)
        directory = self.root / tag
        if tag == self.held:  # the same on every rank: all return here together
            return directory
        work = self.root / f"{tag}{PARTIAL}"
        _barrier()
        if self.rank == 0:
            if work.exists():
                shutil.rmtree(work)  # a leftover from a run killed while saving
            work.mkdir(parents=True)
        _barrier()
        with replacing(work / f"rng_rank{self.rank}.pt") as tmp:
            torch.save(rng_state(), tmp)
        engine.save_checkpoint(str(self.root), tag=work.name, client_state=dict(client_state, step=step),
                               save_latest=False)  # ends in a barrier
        if self.rank == 0:
            files = {str(p.relative_to(work)): p.stat().st_size for p in sorted(work.rglob("*"))
                     if p.is_file() and p.name != MANIFEST}
            atomic_write(work / MANIFEST, json.dumps({"step": step, "tag": tag, "world_size": self.world_size,
                                                      **self.settings, "time": time.time(), "files": files},
                                                     indent=2))
            move_into_place(work, directory, self.root / f".{tag}.replaced")
            atomic_write(self.root / "latest", tag)  # DeepSpeed's pointer to the newest tag (zero_to_fp32.py)
        _barrier()
        self.held = tag
        if self.rank == 0:
            self.prune()
        return directory

    def prune(self) -> None:
        """Keep the newest `keep` sound checkpoints and drop everything older: complete, damaged or unfinished. A
        damaged or unfinished checkpoint newer than all of those stays (a resume skips it). Temporary files that
        killed writes left (of `latest`) go too."""
        self._writable()
        remove_stale_temps(self.root)
        kept = self.sound()[: self.keep]
        if not kept:
            return
        newest_kept = kept[0][0]
        for step, tag in self.tags():
            if step < newest_kept and (step, tag) not in kept:
                shutil.rmtree(self.root / tag, ignore_errors=True)
        for leftover in self.root.glob(f"step*{PARTIAL}"):  # saves that were killed
            shutil.rmtree(leftover, ignore_errors=True)

    def set_aside(self, step: int) -> list[Path]:
        """After resuming from `step` (rank 0 acts, the others return []): rename the checkpoints at `step` and
        later that this process did not restore to `<tag>.superseded` (sound ones, of the trajectory the resume
        abandons) or `<tag>.damaged`, so that the resumed run writes its own and a later resume cannot continue the
        abandoned one. Nothing is deleted. Returns the new paths."""
        self._writable()
        if self.rank != 0:
            return []
        moved = []
        for s, tag in self.tags():
            if s < step or tag == self.held:
                continue
            reason = "superseded" if self.problem(tag) is None and tag not in self.unreadable else "damaged"
            target = self.root / f"{tag}.{reason}"
            n = 1
            while target.exists():
                n += 1
                target = self.root / f"{tag}.{reason}{n}"
            os.replace(self.root / tag, target)
            moved.append(target)
        if moved:
            remaining = self.complete()  # newest first; DeepSpeed's `latest` must not name a moved folder
            if remaining:
                atomic_write(self.root / "latest", remaining[0][1])
            log.warning("resumed from step %d: moved the later checkpoints aside (rename one back to its tag to "
                        "resume from it, or delete them): %s", step, ", ".join(p.name for p in moved))
        return moved

    def _writable(self) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.root}: another run's checkpoints, opened to resume from; not written to")

    # -- restoring ---------------------------------------------------------------------------------------------
    def restore(self, engine, tag: str | None = None) -> tuple[int, dict[str, Any]] | None:
        """Load the newest usable checkpoint (or `tag`) into `engine` and this rank's RNG.

        Returns (step, client_state), or None when there is no checkpoint at all. A damaged checkpoint is skipped
        with a warning; if checkpoints exist but none loads, raises CheckpointError (never silently restarts).
        Every rank then checks that all restored the same step, whatever each found (no rank is left waiting).
        """
        if self.rank == 0 and not self.read_only:
            self._finish_interrupted_saves()
        _barrier()
        try:
            found = self._restore(engine, tag)
        except CheckpointError:
            self._agree(-2)
            raise
        self._agree(found[0] if found else -1)
        return found

    def _finish_interrupted_saves(self) -> None:
        """A save killed after its manifest was written, before its `.partial` folder was renamed into place: finish
        it (the checkpoint is complete), dropping what it was replacing."""
        for work in sorted(self.root.glob(f"step*{PARTIAL}")):
            if not (work / MANIFEST).is_file():
                continue  # killed earlier: prune() removes it
            directory = self.root / work.name.removesuffix(PARTIAL)
            move_into_place(work, directory, self.root / f".{directory.name}.replaced")
            log.warning("%s: finished a save that was killed while moving it into place", directory)
        for old in self.root.glob(".step*.replaced"):
            shutil.rmtree(old, ignore_errors=True)

    def _restore(self, engine, tag: str | None) -> tuple[int, dict[str, Any]] | None:
        if tag is not None and tag not in {t for _, t in self.complete()}:
            if (self.root / f"{tag}{PARTIAL}" / MANIFEST).is_file():
                raise CheckpointError(f"{self.root / tag}: its save was killed while being moved into place; run "
                                      "its own run once (it finishes the save), or resume from another checkpoint")
            raise CheckpointError(f"{self.root / tag}: no such complete checkpoint")
        found = self.first_usable(lambda name: self._load(engine, name), tag)
        if found is None:
            leftovers = [t for _, t in self.tags()]
            if leftovers:
                log.warning("%s: ignoring incomplete checkpoint(s) %s (killed while saving)", self.root, leftovers)
            return None
        step, self.held, client_state = found
        return step, client_state

    def first_usable(self, load: Callable[[str], Any], tag: str | None = None) -> tuple[int, str, Any] | None:
        """Newest first (or only `tag`): the first complete checkpoint without a `problem` that `load(tag)` reads,
        as (step, tag, what `load` returned); None when there is no complete checkpoint. A damaged or unreadable
        one is skipped with a warning; when none loads, CheckpointError says why for each."""
        problems = []
        for step, name in self.complete():
            if tag is not None and name != tag:
                continue
            issue = self.problem(name)
            if issue is None:
                try:
                    return step, name, load(name)
                except CheckpointError:
                    raise  # not a damaged checkpoint: a refusal (e.g. changed settings)
                except UNREADABLE as e:
                    issue = f"{type(e).__name__}: {str(e)[:300]}"
                    self.unreadable.add(name)
            problems.append(f"{name}: {issue}")
            log.warning("checkpoint %s is unusable (%s); falling back to the previous one", self.root / name, issue)
        if problems:
            raise CheckpointError(f"{self.root}: no usable checkpoint: " + "; ".join(problems))
        return None

    def _check_settings(self, tag: str) -> None:
        """Raise CheckpointError if this run's settings differ from those the checkpoint `tag` recorded."""
        recorded = json.loads((self.root / tag / MANIFEST).read_text())
        ours = dict(self.settings, world_size=self.world_size)
        if not recorded.get("zero_stage"):  # without ZeRO (or in an old manifest) any world size loads it
            ours.pop("world_size")
        differences = [f"{RESUME_SETTINGS[k][0]}: the checkpoint has {recorded[k]}, this run {v}; "
                       f"{RESUME_SETTINGS[k][1]}" for k, v in ours.items()
                       if k in recorded and _comparable(k, recorded[k]) != _comparable(k, v)]
        if differences:
            raise CheckpointError(f"cannot resume from {self.root / tag}: " + ". ".join(differences))

    def _load(self, engine, tag: str) -> dict[str, Any]:
        """Check the settings, load the engine's state and this rank's RNG; returns the client state."""
        self._check_settings(tag)
        path, client_state = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise ValueError("DeepSpeed found nothing to load")
        rng_file = self.root / tag / f"rng_rank{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        else:
            log.warning("%s: no RNG state for rank %d (saved with another world size); dropout noise will differ "
                        "from an uninterrupted run", self.root / tag, self.rank)
        return client_state or {}

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


__all__ = ["CheckpointError", "CheckpointManager", "MANIFEST", "check_layout", "rng_state", "set_rng_state", "tag_for"]
