"""ELECTRA pretraining on the DeepSpeed engine: flags, set-up, the training step and the loop.

One step (`pretraining_step`): masking on the device -> engine forward (generator, Gumbel sampling,
discriminator) -> engine.backward -> engine.step. Statistics stay on the device and are read every
`--logging_steps`; nothing in the step waits for the device. Masking, sampling and hidden-state dropout noise are
functions of (seed, step, rank), the data of (seed, step), and attention dropout's noise comes from the saved RNG
state, so a resumed run repeats the uninterrupted one.

Runs under `deepspeed` (any number of GPUs and nodes), `torchrun`, or plain `python` (a one-process world).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from electra_ds.config import PRESETS, RECIPES, ElectraConfig, check_fields, max_predictions, preset
from electra_ds.data.masking import MaskingPlan, mask_tokens
from electra_ds.data.sources import add_source_arguments, source_options
from electra_ds.files import atomic_write
from electra_ds.flops import PFS_DAY, electra_step_flops
from electra_ds.model.hf import RUN_CONFIG
from electra_ds.seeding import (DROPOUT_STREAM, EVAL_STREAM, MASK_STREAM, SAMPLE_STREAM, derive_seed,
                               seed_everything)
from electra_ds.train import engine as ds_engine
from electra_ds.train.checkpoint import CheckpointError, CheckpointManager, tag_for
from electra_ds.train.metrics_log import CollapseMonitor, DeviceMeter, MetricsFile, Wandb, format_line
from electra_ds.train.plots import plot_training_curves

log = logging.getLogger("electra_ds.pretrain")

DEFAULT_CACHE_ROOT = Path(".cache") / "token_caches"
# RC2020 counts --logging_steps/--eval_steps/--save_steps in samples; these are its defaults in steps of 128.
DEFAULT_LOG_EVERY, DEFAULT_EVAL_EVERY, DEFAULT_SAVE_EVERY = 30, 100, 10_000


# How long the other ranks wait for rank 0 to build a token cache (hours for a large corpus; --dist_timeout does not
# bound this one wait).
CACHE_BUILD_TIMEOUT = timedelta(days=7)

# Signals this close together are one stop request (the terminal's Ctrl-C and a launcher passing it on).
SAME_REQUEST_S = 3.0

# A process's first steps compile kernels, autotune and capture CUDA graphs: tokens_per_s leaves them out.
STARTUP_STEPS = 3

# Where torch.save's RuntimeErrors come from when a write fails (a full disk gives "[enforce fail at
# inline_container.cc:672] . unexpected pos ...").
WRITE_FAILURES = ("inline_container", "PytorchStreamWriter")

# Words in the errors gloo / NCCL raise when a peer is gone or a collective timed out.
COLLECTIVE_FAILURES = ("Connection reset", "Connection closed", "Broken pipe", "timed out", "Timeout", "NCCL",
                       "gloo", "ProcessGroup")


class SetupError(ValueError):
    """Bad input found before training starts: what is wrong and where."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot skip."""


class ReplicasDifferError(RuntimeError):
    """Data-parallel ranks hold different weights: they no longer train one model."""


class SaveError(RuntimeError):
    """A checkpoint could not be written (e.g. a full disk)."""


# -- flags ---------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ELECTRA pretraining (generator + discriminator) on DeepSpeed. Unset values come from "
                    "electra_ds.config.RECIPES[--model_size]; precision, ZeRO stage and offload come from the "
                    "DeepSpeed JSON.")
    rc = p.add_argument_group("RC2020 flags (same names and meanings as cccwam/rc2020_electra)")
    rc.add_argument("--mlm_probability", type=float, help="share of tokens masked (recipe: 0.15)")
    rc.add_argument("--mlm_replacement_probability", type=float, default=0.85,
                    help="share of the masked tokens replaced by [MASK] (the rest stay unchanged)")
    rc.add_argument("--max_length", type=int, help="sequence length (recipe: 128 for small)")
    rc.add_argument("--per_device_train_batch_size", type=int,
                    help="micro batch per process (default: the recipe batch / (world size x accumulation))")
    rc.add_argument("--gradient_accumulation_steps", type=int, default=1)
    rc.add_argument("--logging_steps", type=int,
                    help="log every this many SAMPLES, as in RC2020 (3840 = every 30 steps of 128); default "
                         f"every {DEFAULT_LOG_EVERY} steps")
    rc.add_argument("--eval_steps", type=int,
                    help=f"evaluate every this many samples; default every {DEFAULT_EVAL_EVERY} steps")
    rc.add_argument("--save_steps", type=int,
                    help=f"checkpoint every this many samples; default every {DEFAULT_SAVE_EVERY} steps")
    rc.add_argument("--experiment_name", default="pretraining")
    rc.add_argument("--generator_size", type=float, help="generator width / discriminator width (preset's)")
    rc.add_argument("--generator_layer_size", type=float, help="generator depth / discriminator depth")

    run = p.add_argument_group("run")
    run.add_argument("--model_size", default="small", choices=sorted(PRESETS))
    run.add_argument("--model_override", action="append", default=[], metavar="FIELD=VALUE",
                     help="override an ElectraConfig field, e.g. hidden_dropout_prob=0 (repeatable)")
    run.add_argument("--max_steps", type=int, help="optimizer steps")
    run.add_argument("--learning_rate", "--lr", type=float)
    run.add_argument("--warmup_steps", type=int)
    run.add_argument("--weight_decay", type=float, default=0.01)
    run.add_argument("--optimizer", default="auto", choices=ds_engine.OPTIMIZERS,
                     help="auto: electra_adam (Adam without bias correction, as the recipe), or DeepSpeed's CPU "
                          "Adam under ZeRO-Offload")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--compile", default="none", choices=("none", "default", "reduce-overhead", "max-autotune"),
                     help="torch.compile the model inside the engine and the masking; reduce-overhead also replays "
                          "them (forward and backward) as CUDA graphs (the fast path on a GPU); max-autotune also "
                          "autotunes the matrix products (minutes at start). Changes speed only: "
                          "the compiled model runs the PyTorch twins of the kernels, which are their specification, "
                          "but for attention and the generator head's loss and sampling: Triton kernels, which match "
                          "their twins (masks and samples bit for bit); ELECTRA_DS_COMPILED_LAYER_NORM=opaque keeps "
                          "the encoder layers' LayerNorm kernels too, ELECTRA_DS_COMPILED_GELU=opaque the GELU's")
    run.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                     help="a torch._inductor.config setting for --compile (repeatable), e.g. "
                          "coordinate_descent_tuning=True, or combo_kernels=False (True is our model's default: "
                          "COMPILE_DEFAULTS). Meant for speed settings, which leave results as they are up to "
                          "floating-point rounding; a setting such as fallback_random changes them")
    run.add_argument("--deepspeed_config", "--ds_config", default="auto",
                     help="DeepSpeed JSON: a path or a name in ds_configs/ (bf16, bf16_zero2, ...); auto: bf16 on a "
                          "bf16 GPU, fp16 on older GPUs, fp32 without a GPU")
    run.add_argument("--output_dir", help="default: runs/EXPERIMENT_NAME/MODEL_SIZE-genGxL")
    run.add_argument("--resume", default="auto",
                     help="auto: continue from the newest complete checkpoint in output_dir if there is one; "
                          "none: start fresh (refused if output_dir holds checkpoints); or a checkpoint directory")
    run.add_argument("--keep_checkpoints", type=int, default=3)
    run.add_argument("--export_hf", action=argparse.BooleanOptionalAction, default=True,
                     help="export the Hugging Face pair (discriminator/, generator/, tokenizer) to OUT/hf at the end")
    run.add_argument("--eval_batches", type=int, default=100,
                     help="held-out batches (of the per-device batch size) per evaluation, shared out among the ranks")
    run.add_argument("--wandb", default="offline", choices=("offline", "online", "disabled"))
    run.add_argument("--wandb_project", default="electra_ds")
    run.add_argument("--dist_timeout", type=float, default=600.0,
                     help="seconds any collective may wait: a dead or stuck rank fails the others within it (except "
                          "while rank 0 builds the token cache on a first run: the others wait up to "
                          f"{CACHE_BUILD_TIMEOUT.days} days for it)")
    run.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher

    data = p.add_argument_group("data")
    data.add_argument("--data", default="openwebtext",
                      help="a built token cache, or a source to tokenize and cache on first use: a Hugging Face "
                           "dataset name, local text/jsonl/parquet files or folders, or 'builtin'")
    data.add_argument("--cache_root", type=Path, default=DEFAULT_CACHE_ROOT, help="where built caches go")
    data.add_argument("--tokenizer", help="tokenizer for building a cache (default: train one on the source)")
    data.add_argument("--vocab_size_to_train", type=int, default=30522,
                      help="vocabulary of the tokenizer trained when --tokenizer is not given")
    add_source_arguments(data)
    data.add_argument("--two_segments", action="store_true",
                      help="samples of two segments, [CLS] A [SEP] B [SEP] (90%%; the rest one segment), as the "
                           "original ELECTRA data builder makes them; default one segment, as RC2020")
    data.add_argument("--pack_documents", action="store_true",
                      help="windows may span consecutive documents (within a shard) instead of staying inside one")
    data.add_argument("--num_workers", type=int, default=0,
                      help="data loader processes; 0 samples in the main process (about a millisecond a batch)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _override_value(field: str, text: str) -> Any:
    """The text as the field's declared type (ElectraConfig's fields are int, float or int | None)."""
    kind = next(f.type for f in fields(ElectraConfig) if f.name == field)
    return int(text) if str(kind).startswith("int") else float(text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep:
            raise SetupError(f"--model_override {item!r}: expected FIELD=VALUE")
        try:
            check_fields({field: None})
            overrides[field] = _override_value(field, text)
        except ValueError as e:
            raise SetupError(f"--model_override {item!r}: {e}") from None
    return overrides


# -- resolved settings ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything the flags decide, checked before any process group or device is touched."""

    config: ElectraConfig  # vocab_size still to be set from the cache
    overrides: dict[str, Any]
    ds_config: dict
    micro_batch: int
    accumulation: int
    world_size: int
    max_length: int
    mlm_probability: float
    max_predictions: int
    learning_rate: float
    max_steps: int
    warmup_steps: int
    log_every: int
    eval_every: int
    save_every: int
    output_dir: Path

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accumulation * self.world_size


def _every(samples: int | None, default_steps: int, global_batch: int, flag: str) -> int:
    """RC2020 semantics: the flag counts samples; we act every max(1, samples // global batch) steps."""
    if samples is None:
        return default_steps
    if samples < 1:
        raise SetupError(f"{flag} must be >= 1 (it counts samples, as in RC2020), got {samples}")
    steps = max(1, samples // global_batch)
    if samples % global_batch:
        log.warning("%s=%d samples is not a multiple of the global batch %d: acting every %d steps", flag, samples,
                    global_batch, steps)
    return steps


def make_plan(args: argparse.Namespace, world_size: int) -> Plan:
    recipe = RECIPES[args.model_size]
    overrides = parse_overrides(args.model_override)
    for flag in ("generator_size", "generator_layer_size"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    try:
        config = preset(args.model_size, **overrides)
    except ValueError as e:
        raise SetupError(str(e)) from None
    max_length = args.max_length if args.max_length is not None else recipe["max_length"]
    shortest = 4 if args.two_segments else 3
    if max_length < shortest:
        raise SetupError(f"--max_length must be >= {shortest} ([CLS] text [SEP]"
                         f"{' text [SEP]' if args.two_segments else ''}), got {max_length}")
    for flag, least in (("seed", 0), ("keep_checkpoints", 1), ("num_workers", 0)):
        if getattr(args, flag) < least:
            raise SetupError(f"--{flag} must be >= {least}, got {getattr(args, flag)}")
    if max_length > config.max_position_embeddings:
        raise SetupError(f"--max_length {max_length} is longer than the model's {config.max_position_embeddings} "
                         f"positions (max_position_embeddings of preset {args.model_size!r}); lower --max_length or "
                         "--model_override max_position_embeddings=N")
    mlm_probability = args.mlm_probability if args.mlm_probability is not None else recipe["mlm_probability"]
    if not 0 < mlm_probability < 1:
        raise SetupError(f"--mlm_probability must be in (0, 1), got {mlm_probability}")
    if not 0 <= args.mlm_replacement_probability <= 1:
        raise SetupError(f"--mlm_replacement_probability must be in [0, 1], got {args.mlm_replacement_probability}")
    if args.inductor and args.compile == "none":
        raise SetupError("--inductor sets how --compile compiles: add --compile reduce-overhead (or another mode)")
    accumulation = args.gradient_accumulation_steps
    if accumulation < 1:
        raise SetupError(f"--gradient_accumulation_steps must be >= 1, got {accumulation}")
    micro = args.per_device_train_batch_size
    if micro is None:
        micro, rest = divmod(recipe["batch_size"], world_size * accumulation)
        if rest or micro == 0:
            raise SetupError(f"the {args.model_size} recipe's batch of {recipe['batch_size']} does not divide over "
                             f"{world_size} processes x {accumulation} accumulation steps; set "
                             "--per_device_train_batch_size")
    elif micro < 1:
        raise SetupError(f"--per_device_train_batch_size must be >= 1, got {micro}")
    try:
        ds_config = ds_engine.load_ds_config(args.deepspeed_config, micro_batch_size=micro,
                                             gradient_accumulation_steps=accumulation, world_size=world_size)
        if not torch.cuda.is_available():  # on a GPU asking starts CUDA on device 0 in every rank: initialize asks
            ds_engine.check_precision_supported(ds_config)
    except ds_engine.DSConfigError as e:
        raise SetupError(str(e)) from None
    max_steps = args.max_steps if args.max_steps is not None else recipe["max_steps"]
    warmup = args.warmup_steps if args.warmup_steps is not None else recipe["warmup_steps"]
    learning_rate = args.learning_rate if args.learning_rate is not None else recipe["learning_rate"]
    if max_steps < 1 or warmup < 0 or learning_rate <= 0:
        raise SetupError(f"--max_steps must be >= 1, --warmup_steps >= 0 and --learning_rate > 0 (got {max_steps}, "
                         f"{warmup}, {learning_rate})")
    global_batch = micro * accumulation * world_size
    output_dir = Path(args.output_dir) if args.output_dir else (
        Path("runs") / args.experiment_name /
        f"{args.model_size}-gen{config.generator_size:g}x{config.generator_layer_size:g}")
    return Plan(config=config, overrides=overrides, ds_config=ds_config, micro_batch=micro,
                accumulation=accumulation, world_size=world_size, max_length=max_length,
                mlm_probability=mlm_probability, max_predictions=max_predictions(max_length, mlm_probability),
                learning_rate=learning_rate, max_steps=max_steps,
                warmup_steps=warmup,
                log_every=_every(args.logging_steps, DEFAULT_LOG_EVERY, global_batch, "--logging_steps"),
                eval_every=_every(args.eval_steps, DEFAULT_EVAL_EVERY, global_batch, "--eval_steps"),
                save_every=_every(args.save_steps, DEFAULT_SAVE_EVERY, global_batch, "--save_steps"),
                output_dir=output_dir)


# -- the step ------------------------------------------------------------------------------------------------

def masking_inputs(batch: dict[str, torch.Tensor], *, vocab_size: int, special_ids: dict[str, int],
                   mlm_probability: float, max_predictions: int, step: int, seed: int, rank: int,
                   mask_replace_prob: float = 0.85,
                   mask_fn: Callable[..., MaskingPlan] = mask_tokens) -> tuple[MaskingPlan, torch.Tensor]:
    """The masking plan and the model's noise seed (Gumbel draws, dropout masks) of one micro-batch, both functions of
    (seed, step, rank).
    `mask_fn` is `mask_tokens` or a compiled copy of it (see `compiled_masking`)."""
    input_ids = batch["input_ids"]
    device = input_ids.device

    def seed_tensor(stream: int) -> torch.Tensor:  # filled on the device: no host-to-device copy
        return torch.full((), derive_seed(seed, step, rank, stream), dtype=torch.int64, device=device)

    plan = mask_fn(input_ids, batch["attention_mask"], mask_token_id=special_ids["mask"],
                   special_ids=[special_ids[k] for k in ("pad", "cls", "sep", "mask")], vocab_size=vocab_size,
                   mlm_probability=mlm_probability, max_predictions=max_predictions,
                   mask_replace_prob=mask_replace_prob,
                   seed=seed_tensor(MASK_STREAM))
    return plan, seed_tensor(SAMPLE_STREAM)


def compiled_masking(mode: str | None) -> Callable[..., MaskingPlan]:
    """`mask_tokens` through torch.compile (one graph; with mode="reduce-overhead", a CUDA graph of its own)."""
    return torch.compile(mask_tokens, fullgraph=True, dynamic=False, mode=mode)


def inductor_setting(text: str) -> tuple[str, Any]:
    """One `--inductor` value, "KEY=VALUE" -> (key, value): a torch._inductor.config setting (the value a Python
    literal: True, 8, 0.5, 'name'; else the text), checked against the config's keys and value types, so a typo
    fails before a minute-long compile."""
    import ast

    import torch._inductor.config as inductor_config

    key, sep, raw = (part.strip() for part in text.partition("="))
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. combo_kernels=True")
    known = inductor_config.get_config_copy()
    if key not in known:
        raise argparse.ArgumentTypeError(f"{key!r} is not a torch._inductor.config setting (torch {torch.__version__})")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    default = known[key]
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if default is not None and not (type(value) is type(default) or (isinstance(value, type(default)) and
                                                                      not isinstance(value, bool))):
        raise argparse.ArgumentTypeError(f"{key}={raw}: expected {type(default).__name__}, like its default "
                                         f"{default!r}")
    return key, value


def apply_inductor_settings(settings: dict[str, Any]) -> None:
    """Set these torch._inductor.config settings (`inductor_setting`'s pairs) for every later compile in this
    process."""
    import torch._inductor.config as inductor_config

    for key, value in settings.items():
        setattr(inductor_config, key, value)


# Inductor settings our compiled model takes unless --inductor sets them otherwise. combo_kernels: a graph's
# independent kernels (the backward's many small reductions and copies among them) launch as one; on an H200
# (e5c1529, benchmarks/results/h200_e5c1529_combo_kernels.md) 9.44 against 10.30 ms per step, 975 kernels against
# 1,623. It concerns GPU (Triton) code only: compiles for the CPU ignore it.
COMPILE_DEFAULTS: dict[str, Any] = {"combo_kernels": True}


def compile_options(mode: str | None, inductor: dict[str, Any] | None = None) -> dict[str, Any]:
    """torch.compile's `options` for our model: the settings of `mode` (None: the default; torch.compile takes a mode
    or options, not both), then COMPILE_DEFAULTS, then `inductor`."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode or "default"), **COMPILE_DEFAULTS, **(inductor or {})}


def compile_engine(engine, mode: str | None, inductor: dict[str, Any] | None = None) -> Callable[..., MaskingPlan]:
    """What `--compile` does: torch.compile the engine's model (mode None: the default; `compile_options`) and the
    masking, with the `inductor` config settings (`apply_inductor_settings`; process-wide); returns the masking
    function for `pretraining_step`."""
    apply_inductor_settings(inductor or {})
    engine.compile(compile_kwargs={"options": compile_options(mode, inductor)})
    return compiled_masking(mode)


def forward(engine, batch: dict[str, torch.Tensor], **masking):
    """Mask `batch` (see `masking_inputs`) and run the engine's forward; returns PretrainOutput."""
    torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays (no-op without them)
    plan, noise_seed = masking_inputs(batch, vocab_size=engine.module.config.vocab_size, **masking)
    return engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], plan, noise_seed)


def pretraining_step(engine, batch: dict[str, torch.Tensor | None], *, special_ids: dict[str, int],
                     mlm_probability: float, max_predictions: int, step: int, seed: int,
                     mask_replace_prob: float = 0.85,
                     mask_fn: Callable[..., MaskingPlan] = mask_tokens):
    """One micro-batch: masking -> forward -> backward -> step (DeepSpeed applies the optimizer at the
    accumulation boundary). `step` counts micro-batches; `batch` is already on the engine's device."""
    out = forward(engine, batch, special_ids=special_ids, mlm_probability=mlm_probability,
                  max_predictions=max_predictions, step=step, seed=seed, rank=engine.global_rank,
                  mask_replace_prob=mask_replace_prob, mask_fn=mask_fn)
    engine.backward(out.loss)
    engine.step()
    return out


@torch.no_grad()
def evaluate(engine, sampler, *, batches: int, special_ids: dict[str, int], mlm_probability: float,
             max_predictions: int, seed: int, mask_replace_prob: float) -> dict[str, float]:
    """Held-out loss and accuracies over `batches` batches of `sampler` (one stream for all ranks), with fixed
    masks and samples, dropout off, training RNG untouched. The ranks share the batches out (rank r takes
    r, r + world size, ...), so at a given per-device batch size the figures do not depend on how many ranks
    there are. Every rank runs as many forwards (ZeRO-3 gathers the weights in each, on all ranks together): one
    past the end repeats a batch and is not counted."""
    device = engine.device
    meter = DeviceMeter(device)
    engine.eval()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
        for i in range(engine.global_rank, math.ceil(batches / engine.world_size) * engine.world_size,
                       engine.world_size):
            batch = ds_engine.device_batch({k: torch.from_numpy(v) for k, v in sampler.batch(i % batches).items()},
                                           device)
            out = forward(engine, batch, special_ids=special_ids, mlm_probability=mlm_probability,
                          max_predictions=max_predictions, step=i % batches, seed=seed, rank=0,
                          mask_replace_prob=mask_replace_prob)
            if i < batches:
                meter.add(out)
    engine.train()
    values = meter.read()
    values.pop("nonfinite_steps")
    return values


# -- signals -------------------------------------------------------------------------------------------------

class GracefulStop:
    """SIGTERM / SIGINT: finish the step (with several ranks: the few more that `StopVote` takes), save a
    checkpoint, exit 0. A second signal, SAME_REQUEST_S or more after the first, exits at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # A launcher passes on the Ctrl-C that the terminal also sent each rank (deepspeed as a SIGTERM): a
            # signal right after the first is the same request, not the second one of an impatient user.
            if time.monotonic() - self._first_at < SAME_REQUEST_S:
                return
            raise KeyboardInterrupt(f"second {name}: exiting without saving")
        self.requested, self._first_at = name, time.monotonic()
        log.warning("%s received: finishing this step (several ranks: %d more), saving a checkpoint, then exiting",
                    name, StopVote.LAG)


class StopVote:
    """Whether any rank was asked to stop, the same answer on every rank at the same step, without making the step
    wait: each step every rank starts an all-reduce (MAX) of its flag over a gloo group of its own, and reads the one
    it started LAG steps before, finished by then. One rank: its own flag, at once."""

    LAG = 2

    def __init__(self, world_size: int, timeout: timedelta) -> None:
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo", timeout=timeout) if world_size > 1 else None  # every rank
        self.pending: deque[tuple[Any, torch.Tensor]] = deque()

    def __call__(self, requested: bool) -> bool:
        import torch.distributed as dist

        if self.group is None:
            return requested
        flag = torch.tensor([int(requested)], dtype=torch.int32, device="cpu")  # never a device sync
        self.pending.append((dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag))
        if len(self.pending) <= self.LAG:
            return False
        work, flag = self.pending.popleft()
        work.wait()
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the votes still under way (every rank started as many), then drop the group."""
        import torch.distributed as dist

        while self.pending:
            self.pending.popleft()[0].wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None


# -- set-up helpers ------------------------------------------------------------------------------------------

def prepare_cache(args: argparse.Namespace, rank: int) -> Path:
    """Rank 0 finds or builds the token cache while the others wait; every rank gets its path (or the error).

    The others wait over a gloo group of their own with a timeout of CACHE_BUILD_TIMEOUT, not --dist_timeout:
    building a large corpus takes hours."""
    import torch.distributed as dist

    group = None
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=CACHE_BUILD_TIMEOUT)  # every rank, before rank 0 builds
    result: list[Any] = [None]
    if rank == 0:
        try:
            from electra_ds.data.cache import ensure_cache

            result[0] = str(ensure_cache(args.data, args.cache_root, args.tokenizer,
                                         vocab_size=args.vocab_size_to_train, **source_options(args)))
        except Exception as e:  # noqa: BLE001 - every rank must hear about it, not just rank 0
            result[0] = ValueError(f"--data {args.data!r}: {type(e).__name__}: {e}")
    if group is not None:
        dist.broadcast_object_list(result, src=0, group=group)
        dist.destroy_process_group(group)
    if isinstance(result[0], Exception):
        raise SetupError(str(result[0]))
    return Path(result[0])


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value


def check_output_dir(out: Path, run_config: dict, resume: str) -> None:
    """Refuse an output_dir whose checkpoints belong to another model or tokenizer."""
    ckpt = CheckpointManager(out / "checkpoints", keep=1, rank=0, world_size=1)
    if not ckpt.tags():
        return
    if resume == "none":
        raise SetupError(f"{out} already holds checkpoints and --resume none was given: choose another --output_dir "
                         "or resume (--resume auto)")
    path = out / RUN_CONFIG
    if not path.is_file():
        raise SetupError(f"{out / 'checkpoints'} holds checkpoints but {path} is missing, so they cannot be checked "
                         "against this run: choose another --output_dir")
    previous = json.loads(path.read_text())
    if previous.get("tokenizer_hash") != run_config["tokenizer_hash"]:
        raise SetupError(f"{out} holds checkpoints of a run with tokenizer {previous.get('tokenizer_hash')}, this "
                         f"run's data uses {run_config['tokenizer_hash']}: choose another --output_dir")
    if previous.get("model") != run_config["model"]:
        diff = sorted(k for k in set(previous.get("model", {})) | set(run_config["model"])
                      if previous.get("model", {}).get(k) != run_config["model"].get(k))
        details = ", ".join(f"{k}: {previous.get('model', {}).get(k)} -> {run_config['model'].get(k)}" for k in diff)
        raise SetupError(f"{out} holds checkpoints of another model ({details}): choose another --output_dir")
    changed = sorted(k for k, v in run_config["flags"].items()
                     if k not in ("resume", "local_rank") and previous.get("flags", {}).get(k) != v)
    if changed:
        log.warning("resuming %s with changed flags: %s", out,
                    ", ".join(f"{k}: {previous['flags'].get(k)} -> {run_config['flags'][k]}" for k in changed))
    before, now = previous.get("ds_config", {}), run_config["ds_config"]
    edited = sorted(k for k in before.keys() | now.keys()
                    if k not in ds_engine.BATCH_KEYS and before.get(k) != now.get(k))  # those follow the flags
    if "ds_config" in previous and edited:
        log.warning("resuming %s with a changed DeepSpeed config (keys %s)", out, ", ".join(edited))
    if previous.get("world_size", run_config["world_size"]) != run_config["world_size"]:
        log.warning("resuming %s on %d process(es), the checkpoint's run had %d: each rank's data, masks and dropout "
                    "change, so the run no longer repeats an uninterrupted one", out, run_config["world_size"],
                    previous["world_size"])


def loss_scale(engine) -> float | None:
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)
    scale = getattr(config, "cur_scale", None) if config is not None else getattr(opt, "cur_scale", None)
    return None if scale is None else float(scale)


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm (before clipping): DeepSpeed's, or ElectraAdam's where it clips."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = getattr(engine.basic_optimizer, "grad_norm", None)
    return None if norm is None else float(norm)


def _full_fp32(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The fp32 master copy of `param` (all ranks call this: under ZeRO it gathers)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is not None:
        return full
    opt = engine.optimizer
    fp16_groups = getattr(opt, "fp16_groups", None)
    if fp16_groups is not None:  # DeepSpeed's fp16/bf16 optimizers without ZeRO keep fp32 masters beside
        masters = getattr(opt, "fp32_groups", None) or [[flat] for flat in opt.fp32_groups_flat]
        for low, high in zip(fp16_groups, masters):
            for p, master in zip(low, high):
                if p is param:
                    return master.view(param.shape)
    return param.detach()


def export_hf(engine, config: ElectraConfig, out_dir: Path, tokenizer_dir: Path, rank: int) -> Path | None:
    """Write the fp32 master weights as the Hugging Face pair (rank 0 writes; every rank takes part)."""
    from electra_ds.model import ElectraForPretraining, export_hf_pair

    full = {name: _full_fp32(engine, p) for name, p in engine.module.named_parameters()}
    if rank != 0:
        return None
    model = ElectraForPretraining(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(full[name].detach().float().cpu().view(p.shape))
    return export_hf_pair(model, out_dir, tokenizer_dir=tokenizer_dir)


def weight_stats(engine) -> torch.Tensor:
    """(ranks, parameter tensors, 3): [any non-finite, sum, sum of |w|] in float64 of each rank's weights (its shard
    under ZeRO-3), gathered from every rank; every rank takes part."""
    import torch.distributed as dist

    local = torch.stack([torch.stack([(~torch.isfinite(t)).any().double(), t.sum(dtype=torch.float64),
                                      t.abs().sum(dtype=torch.float64)]).to(engine.device)  # offloaded shards too
                         for t in (getattr(p, "ds_tensor", p).detach() for p in engine.module.parameters())])
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local.unsqueeze(0).cpu()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return torch.stack(gathered).cpu()


def replica_gaps(stats: torch.Tensor) -> list[float]:
    """Per rank: how far its replica is from rank 0's, as the largest gap of a tensor's sum or sum of |w| relative
    to that tensor's sum of |w| (0 for rank 0)."""
    gap = (stats[:, :, 1:] - stats[0, :, 1:]).abs().amax(dim=2) / stats[0, :, 2].clamp(min=1e-30)
    return gap.amax(dim=1).tolist()


def differing_ranks(stats: torch.Tensor, rtol: float = 1e-6) -> list[int]:
    """Ranks whose replica differs from rank 0's by more than rounding noise. Identical averaged gradients give
    bit-identical updates, so any real difference means a rank trained on its own gradients or started elsewhere."""
    return [rank for rank, gap in enumerate(replica_gaps(stats)) if gap > rtol]


def _weights_finite(engine) -> bool:
    """Whether every rank's weights (its shard under ZeRO-3) are finite; every rank takes part."""
    return not bool(weight_stats(engine)[..., 0].any())


def _last_good(checkpoints: CheckpointManager) -> str:
    sound = checkpoints.sound()
    return str(checkpoints.root / sound[0][1]) if sound else "none saved yet"


# -- the run -------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> Path:
    """Pretrain as `args` say; returns the output directory."""
    from electra_ds.data.cache import CacheError, TokenCache
    from electra_ds.data.sampler import SegmentSampler, batches
    from electra_ds.model import ElectraForPretraining

    _, world_size, _ = ds_engine.world_from_env()
    plan = make_plan(args, world_size)  # every flag checked before any process group or device work
    if args.resume not in ("auto", "none") and not Path(args.resume).is_dir():
        raise SetupError(f"--resume {args.resume!r}: not 'auto', 'none' or a checkpoint directory")
    rank, world_size, _ = ds_engine.setup_distributed(args.dist_timeout)
    out = plan.output_dir

    cache_path = prepare_cache(args, rank)
    cache = TokenCache(cache_path)
    special = cache.special_ids
    vocab = plan.overrides.get("vocab_size", cache.vocab_size)
    if vocab < cache.vocab_size or max(special.values()) >= vocab:
        raise SetupError(f"the model's vocab_size {vocab} is smaller than the vocabulary of the cache {cache_path} "
                         f"({cache.vocab_size} tokens, tokenizer {cache.tokenizer_hash}): its token ids would not fit")
    config = plan.config.replace(vocab_size=vocab, pad_token_id=special["pad"])
    run_config = {"experiment_name": args.experiment_name, "model": config.to_dict(),
                  "tokenizer_hash": cache.tokenizer_hash, "data": str(cache_path.resolve()), "special_ids": special,
                  "world_size": world_size, "global_batch_size": plan.global_batch, "max_length": plan.max_length,
                  "max_predictions": plan.max_predictions, "ds_config": plan.ds_config,
                  "flags": {k: _jsonable(v) for k, v in vars(args).items()}}
    check_output_dir(out, run_config, args.resume)

    seed_everything(args.seed)  # the same initial weights on every rank
    model = ElectraForPretraining(config)
    engine = ds_engine.initialize(model, plan.ds_config, learning_rate=plan.learning_rate,
                                  warmup_steps=plan.warmup_steps, max_steps=plan.max_steps,
                                  weight_decay=args.weight_decay, optimizer=args.optimizer)
    mask_fn = mask_tokens
    if args.compile != "none":
        mask_fn = compile_engine(engine, None if args.compile == "default" else args.compile,
                                 dict(args.inductor))
    device = engine.device
    # torch's generator: its own noise per rank (the model's dropout masks derive from each step's noise seed instead)
    seed_everything(derive_seed(args.seed, 0, rank, DROPOUT_STREAM))

    settings = {"zero_stage": ds_engine.zero_stage(plan.ds_config), "precision": ds_engine.precision(plan.ds_config),
                "learning_rate": plan.learning_rate, "weight_decay": args.weight_decay,
                "optimizer": ds_engine.resolve_optimizer(args.optimizer, plan.ds_config),
                "flat_layout": model.layout_fingerprint()}  # a resume must keep these
    checkpoints = CheckpointManager(out / "checkpoints", keep=args.keep_checkpoints, rank=rank, world_size=world_size,
                                    settings=settings)
    source = checkpoints
    resume_tag = None
    if args.resume not in ("auto", "none"):
        given = Path(args.resume)
        if given.parent.resolve() != checkpoints.root.resolve():
            foreign = given.parent.parent / RUN_CONFIG
            theirs = json.loads(foreign.read_text()).get("tokenizer_hash") if foreign.is_file() else None
            if theirs not in (None, cache.tokenizer_hash):
                raise SetupError(f"--resume {given}: its run ({foreign}) used tokenizer {theirs}, this run's data "
                                 f"{cache.tokenizer_hash}: the token ids would mean other words. Use that run's --data")
            source = CheckpointManager(given.parent, keep=args.keep_checkpoints, rank=rank, world_size=world_size,
                                       settings=settings, read_only=True)
        resume_tag = given.name
    try:
        restored = None if args.resume == "none" else source.restore(engine, resume_tag)
    except CheckpointError as e:
        raise SetupError(str(e)) from None
    start_step, state = restored if restored else (0, {})
    if restored:  # checkpoints here past the one resumed from belong to an abandoned trajectory, or are damaged
        checkpoints.set_aside(start_step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_CONFIG, json.dumps(run_config, indent=2, default=str))
        if restored:
            log.info("resumed from step %d (%s)", start_step, source.root / tag_for(start_step))

    metrics = MetricsFile(out / "metrics.jsonl")
    wandb_id = state.get("wandb_id")
    replays = rank == 0 and metrics.truncate_after(start_step) > 0
    if rank == 0 and wandb_id and (replays or source is not checkpoints):
        # wandb ignores steps at or below a run's last logged one (and another output_dir's run must stay its own),
        # so the replayed steps go to a new run
        log.info("resuming from step %d of a run whose wandb run may hold later steps: wandb logs to a new run (%s "
                 "keeps the earlier history)", start_step, wandb_id)
        run_config = {**run_config, "resumed_from_wandb_run": wandb_id}
        wandb_id = None
    wandb = (Wandb(args.wandb, out, args.wandb_project, args.experiment_name, run_config, wandb_id)
             if rank == 0 else None)

    layout = {"pack": args.pack_documents, "two_segments": args.two_segments}
    sampler = SegmentSampler(cache, plan.max_length, plan.micro_batch, args.seed, rank, world_size, **layout,
                             max_positions=config.max_position_embeddings)
    eval_sampler = None
    try:
        eval_sampler = SegmentSampler(TokenCache(cache_path, split="heldout"), plan.max_length, plan.micro_batch,
                                      derive_seed(args.seed, 0, 0, EVAL_STREAM), **layout)  # see `evaluate`
    except CacheError as e:  # a cache without held-out documents still trains
        log.warning("no evaluation: %s", e)
    with torch.random.fork_rng(devices=[]):  # a DataLoader draws its base seed from the global RNG: keep dropout's
        data = batches(sampler, start_step * plan.accumulation, num_workers=args.num_workers,
                       pin_memory=device.type == "cuda")

    flops_per_step = electra_step_flops(config, plan.global_batch, plan.max_length).total
    tokens_per_step = plan.global_batch * plan.max_length
    step_kwargs = dict(special_ids=special, mlm_probability=plan.mlm_probability,
                       max_predictions=plan.max_predictions, seed=args.seed,
                       mask_replace_prob=args.mlm_replacement_probability, mask_fn=mask_fn)
    collapse = CollapseMonitor(plan.warmup_steps)
    meter = DeviceMeter(device)
    elapsed_before = float(state.get("elapsed_s", 0.0))
    t_start = time.perf_counter()
    window = {"start": t_start, "step": start_step, "paused": 0.0}  # the logging interval; eval/saves don't count
    startup_out_to = start_step  # this process's steps up to here are out of the window (exclude_startup)
    saved_window = state.get("log_window")  # a checkpoint between two logging steps holds its part of the interval
    if saved_window and meter.load_state(saved_window, rank, world_size):
        window.update(start=t_start - saved_window["seconds"], step=saved_window["step"])

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def emit(record: dict[str, Any]) -> None:
        if rank == 0:
            metrics.append(record)
            wandb.log(record)
            bar.write(format_line(record))

    def log_train(step: int, lr: float) -> None:
        stats = meter.read()  # waits for the device: the interval then covers its work, not just the queueing
        seconds = max(time.perf_counter() - window["start"] - window["paused"], 1e-9)
        record = {"step": step, "split": "train", **stats, "lr": lr,
                      "loss_scale": loss_scale(engine), "grad_norm": grad_norm(engine),
                      "tokens_per_s": (step - window["step"]) * tokens_per_step / seconds, "elapsed_s": elapsed(),
                      "flops": flops_per_step * step, "pfs_days": flops_per_step * step / PFS_DAY,
                      "skipped_steps": engine.skipped_steps}
        window.update(start=time.perf_counter(), step=step, paused=0.0)
        _check_finite(record, engine, checkpoints)
        collapse.update(step, record)
        emit(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)

    def pause_start() -> float:
        """Now, once the queued training steps are done (their time belongs to training, not to the pause)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def exclude_startup(step: int) -> None:
        """Take this process's first STARTUP_STEPS steps out of the logging window (steps and time): those since
        the window opened (at the start, or later if a record was written within them) or since an earlier call
        (a checkpoint saved within them)."""
        nonlocal startup_out_to
        since_step, since = max(window["step"], startup_out_to), max(window["start"], t_start)
        startup_s = pause_start() - since - window["paused"]
        window["paused"] += startup_s
        window["step"] += step - since_step
        startup_out_to = step
        if rank == 0:
            log.info("steps %d-%d took %.1f s (compilation, autotuning, CUDA-graph capture); tokens_per_s leaves "
                     "them out", since_step + 1, step, startup_s)

    def run_eval(step: int) -> None:
        t = pause_start()
        emit({"step": step, "split": "eval", **evaluate(
            engine, eval_sampler, batches=args.eval_batches, special_ids=special, mlm_probability=plan.mlm_probability,
            max_predictions=plan.max_predictions, seed=derive_seed(args.seed, 0, 0, EVAL_STREAM),
            mask_replace_prob=args.mlm_replacement_probability)})
        window["paused"] += time.perf_counter() - t

    def save(step: int) -> Path | None:
        """A checkpoint, and the training curves redrawn from metrics.jsonl (rank 0: their path). Non-finite weights
        (which logging steps alone may miss) stop the run instead of being saved."""
        if step < start_step + STARTUP_STEPS:  # the saved logging window must not carry them into a resumed run
            exclude_startup(step)
        t = pause_start()
        stats = weight_stats(engine)
        if stats[..., 0].any():
            raise NonFiniteError(f"non-finite weights at step {step}: not saving them; last good checkpoint: "
                                 f"{_last_good(checkpoints)}. Lower --learning_rate, or use fp32/bf16 instead of fp16")
        differing = differing_ranks(stats) if settings["zero_stage"] < 3 else []  # ZeRO-3 ranks hold shards
        if differing:
            gaps = replica_gaps(stats)
            raise ReplicasDifferError(
                f"at step {step} the weights of rank(s) {differing} differ from rank 0's (relative gaps "
                f"{', '.join(f'{gaps[r]:.1e}' for r in differing)}): the ranks stopped training "
                "one model (gradients not averaged across ranks?). Not saving; last good checkpoint: "
                f"{_last_good(checkpoints)}")
        log_window = {"step": window["step"], "seconds": t - window["start"] - window["paused"], **meter.state()}
        try:
            checkpoints.save(engine, step, {"elapsed_s": elapsed(), "run": args.experiment_name,
                                            "wandb_id": wandb.id if wandb else state.get("wandb_id"),
                                            "log_window": log_window})
        except (OSError, RuntimeError) as e:
            if not isinstance(e, OSError) and not any(k in str(e) for k in WRITE_FAILURES):
                raise  # not the disk: a collective, a data loader worker killed, ...
            free_gb = shutil.disk_usage(checkpoints.root).free / 1e9 if checkpoints.root.is_dir() else float("nan")
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise SaveError(f"could not write the checkpoint of step {step} under {checkpoints.root} ({free_gb:.1f} "
                            f"GB free there): {type(e).__name__}: {first_line}. Earlier "
                            f"checkpoints are intact (last: {_last_good(checkpoints)}); free some space or fix the "
                            "directory, then run the same command to resume") from e
        curves = plot_training_curves(metrics.records(), out / "training_curves.png", args.experiment_name) \
            if rank == 0 else None
        window["paused"] += time.perf_counter() - t
        return curves

    from tqdm.auto import tqdm

    if rank == 0:
        log.info("training %s: %d -> %d steps, global batch %d x %d tokens, %s, ZeRO %d, %d process(es); output %s",
                 args.experiment_name, start_step, plan.max_steps, plan.global_batch, plan.max_length,
                 ds_engine.precision(plan.ds_config), ds_engine.zero_stage(plan.ds_config), world_size, out)
    bar = tqdm(total=plan.max_steps, initial=start_step, disable=True if rank else None, dynamic_ncols=True,
               desc=args.experiment_name, unit="step")
    evaluating = eval_sampler is not None and args.eval_batches > 0
    step = start_step
    stopped_by = None
    saved_at = curves = None
    engine.train()
    stop_vote = StopVote(world_size, timedelta(seconds=args.dist_timeout))
    with GracefulStop() as stop, closing(data):  # closing ends the loader's workers
        while step < plan.max_steps:
            lr = engine.get_lr()[0]  # the rate this step's update uses: the schedule steps right after the update
            for micro in range(plan.accumulation):
                batch = ds_engine.device_batch(next(data), device)
                meter.add(pretraining_step(engine, batch, step=step * plan.accumulation + micro, **step_kwargs))
            step += 1
            bar.update()
            log_now = step % plan.log_every == 0 or step == plan.max_steps
            if step == start_step + STARTUP_STEPS and not log_now:  # else the window would be left with no steps
                exclude_startup(step)
            if log_now:
                log_train(step, lr)
            if evaluating and (step % plan.eval_every == 0 or step == plan.max_steps):
                run_eval(step)
            if stop_vote(stop.requested is not None):
                stopped_by = stop.requested or "a signal on another rank"
                break
            if step % plan.save_every == 0:
                curves, saved_at = save(step), step
        stop_vote.close()
        if saved_at != step:  # the last step, unless saved just now (a resumed finished run saves and plots here)
            curves = save(step)
    bar.close()

    if stopped_by:
        if rank == 0:
            log.warning("stopped by %s at step %d; checkpoint %s. Run the same command again to resume.", stopped_by,
                        step, checkpoints.root / tag_for(step))
        if wandb:
            wandb.finish()
        return out
    hf_dir = None
    if args.export_hf:
        hf_dir = export_hf(engine, config, out / "hf", cache.tokenizer_path, rank)
    if rank == 0:
        records = metrics.records()  # this run's and, after a resume, the earlier runs' records
        last = {split: next((r for r in reversed(records) if r.get("split") == split), {})
                for split in ("train", "eval")}
        _summary(out, step, last["train"], last["eval"], curves, checkpoints.root / tag_for(step), hf_dir, elapsed())
    if wandb:
        wandb.finish()
    return out


def _check_finite(record: dict[str, Any], engine, checkpoints: CheckpointManager) -> None:
    """Skipped fp16/bf16 overflow steps are fine; non-finite weights, or a window of nothing but non-finite
    losses, stop the run (pointing at the last good checkpoint)."""
    if not record["nonfinite_steps"]:
        return
    every_step_bad = not math.isfinite(record["loss"])
    if every_step_bad or not _weights_finite(engine):
        raise NonFiniteError(f"non-finite loss/weights by step {record['step']} ({record['nonfinite_steps']} "
                             "non-finite micro-batches in the last logging interval); last good checkpoint: "
                             f"{_last_good(checkpoints)}. Lower --learning_rate, or use fp32/bf16 instead of fp16")


def _summary(out: Path, step: int, train: dict, evaluation: dict, curves: Path | None, checkpoint: Path,
             hf_dir: Path | None, elapsed: float) -> None:
    def fmt(record: dict, key: str, spec: str) -> str:
        v = record.get(key)
        return "n/a" if v is None else format(v, spec)

    lines = [f"done: {step} steps in {elapsed:.1f} s",
             f"  final train: loss {fmt(train, 'loss', '.4f')} (mlm {fmt(train, 'mlm_loss', '.4f')}, disc "
             f"{fmt(train, 'disc_loss', '.4f')}), gen_acc {fmt(train, 'gen_acc', '.3f')}, disc_acc replaced "
             f"{fmt(train, 'disc_acc_replaced', '.3f')} / original {fmt(train, 'disc_acc_original', '.3f')}, "
             f"{fmt(train, 'tokens_per_s', ',.0f')} tokens/s",
             f"  final eval:  loss {fmt(evaluation, 'loss', '.4f')} (mlm {fmt(evaluation, 'mlm_loss', '.4f')}, disc "
             f"{fmt(evaluation, 'disc_loss', '.4f')}), gen_acc {fmt(evaluation, 'gen_acc', '.3f')}",
             f"  metrics:    {out / 'metrics.jsonl'}",
             f"  curves:     {curves or 'n/a'}",
             f"  checkpoint: {checkpoint}",
             f"  HF export:  {hf_dir or 'not exported (--no-export_hf)'}"]
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done or stopped by a signal, 2 bad set-up, 3 non-finite training or ranks that disagree, 5 a
    checkpoint that could not be written; a failed collective (another rank died or hung) ends the process at once
    with 4."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run(args)
    except SetupError as e:
        log.error("%s", e)
        return 2
    except (NonFiniteError, ReplicasDifferError) as e:
        log.error("%s", e)
        return 3
    except SaveError as e:
        log.error("%s", e)
        return 5
    except RuntimeError as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and any(k in str(e) for k in COLLECTIVE_FAILURES):
            log.error("a collective operation failed: another rank died, hung or was killed (see its log). "
                      "Cause: %s", str(e).splitlines()[0][:500])
            # Leave without running the broken process group's destructors: at interpreter exit they can abort
            # the process (std::terminate, exit status -6 instead of 4).
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(4)
        raise
    import torch.distributed as dist

    if dist.is_initialized():  # NCCL warns at exit (possible leaks) when the group is left to the destructors
        dist.destroy_process_group()
    return 0


__all__ = ["GracefulStop", "NonFiniteError", "Plan", "ReplicasDifferError", "SaveError", "SetupError",
           "apply_inductor_settings", "build_parser", "compile_options", "differing_ranks", "evaluate", "forward",
           "inductor_setting", "main", "make_plan", "parse_args",
           "pretraining_step", "replica_gaps", "run", "weight_stats"]

if __name__ == "__main__":
    sys.exit(main())
