"""Training-step throughput of our ELECTRA next to Hugging Face's modules (DESIGN.md section 4).

Every variant runs the same training step on the same batches (random token ids of the preset's vocabulary,
masked on the device with `mask_tokens`, the masking noise seeded per step as `pretraining_step` seeds it):
masking -> generator -> Gumbel sampling -> discriminator -> loss -> backward -> clip 1.0 -> optimizer -> schedule.
Our variants get the batch as the training loop does (`engine.device_batch`: no attention mask when every
row is full); compiled variants, ours and HF's, compile the masking too (`pretrain.compiled_masking`).

  hf_eager                 transformers' ElectraForMaskedLM + ElectraForPreTraining wired as the seed code does
                           (benchmarks/hf_baseline.py), torch AdamW (fused on CUDA), autocast (+ GradScaler for fp16)
  ours_ds_triton           our model through the DeepSpeed engine (`pretraining_step`), Triton kernels (CUDA only)
  ours_ds_torch            the same with the kernels' PyTorch twins
  ours_bare                our model + our optimizer (clipping on the device) without DeepSpeed, autocast: the
                           engine's overhead is the difference to ours_ds_*
  ours_compile             ours_bare with torch.compile(model), over the kernels' PyTorch twins
  ours_compile_cudagraphs  torch.compile(model, mode="reduce-overhead") (CUDA graphs; CUDA only)
  ours_ds_compile_cudagraphs    the training path of `pretrain.py --compile reduce-overhead`: ours_ds_torch with
                                engine.compile(mode="reduce-overhead") (CUDA only); minus ours_compile_cudagraphs,
                                the engine's cost
  ours_ds_compile_max_autotune  likewise with mode="max-autotune": autotuned Triton matrix products with fused
                                epilogues, CUDA graphs (CUDA only; minutes of autotuning in its warm-up)
  hf_compile               hf_eager with torch.compile(model)
  hf_compile_cudagraphs    likewise with mode="reduce-overhead" (CUDA only)

Compiled variants run last (each CUDA-graph one right after its plain compile, so the on-disk compile caches can
serve it), so a time limit hit while compiling still leaves the eager numbers; a variant that fails records its
error and the next one runs; the JSON is rewritten after every variant.

Timing: after `--warmup` steps, each of `--steps` steps is timed with CUDA events (perf_counter elsewhere);
we report the median and p10/p90. FLOPs are `electra_ds.flops.executed_step_flops` (the HF wiring runs the
generator head on every position: max_predictions = max_length). MFU is against a bf16 matrix-product rate
measured on the device at start and against the datasheet's dense bf16 peak when the device is known.
Host syncs per step: one more step after the timed ones, counted with torch.cuda.set_sync_debug_mode on a GPU,
and with `electra_ds.host_sync.SyncCounter` for our eager variants on the CPU.

  python benchmarks/throughput.py --model_size small --batch_size 128 --precision bf16 --json out.json
  python benchmarks/throughput.py --device cpu --model_size tiny --batch_size 4 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: import `benchmarks.*` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch._inductor.codecache import PyCodeCache

from benchmarks import step_profile
from benchmarks.hf_baseline import (build_hf_pair, check_same_loss, hf_param_groups, random_batch,
                                    special_token_ids)
from electra_ds import kernels
from electra_ds.config import PRESETS, RECIPES, ElectraConfig, max_predictions, preset
from electra_ds.data.masking import MaskingPlan, mask_tokens
from electra_ds.files import atomic_write
from electra_ds.flops import executed_step_flops, recipe_flops
from electra_ds.host_sync import SyncCounter
from electra_ds.train.engine import device_batch
from electra_ds.train.pretrain import COMPILE_DEFAULTS, apply_inductor_settings, inductor_setting

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dense bf16 tensor-core peak from the datasheets, by a substring of torch.cuda.get_device_name().
# The first match wins: the bare "H100" (SXM, e.g. "NVIDIA H100 80GB HBM3") comes after the forms with other
# peaks; those without a figure here (H100 NVL) report no datasheet MFU rather than the SXM's.
DATASHEET_BF16_TFLOPS = (("H200", "NVIDIA H200 (dense bf16)", 989.0),
                         ("H100 PCIe", "NVIDIA H100 PCIe (dense bf16)", 756.0),
                         ("H100 NVL", "unknown (H100 NVL)", None),
                         ("H100", "NVIDIA H100 SXM (dense bf16)", 989.0))
SPEED_OF_RECIPE_STEPS = 1_000_000  # "hours for 1M steps"
ERROR_CHARS = 2000
# Every variant record has these keys (None where a variant did not run or failed).
RECORD_FIELDS = ("name", "description", "status", "error", "traceback", "kernels", "notes",
                 "executed_flops_per_step", "build_s", "warmup_s", "ms_per_step", "ms_p10", "ms_p90", "ms_wall_mean",
                 "tokens_per_s", "tflops", "mfu_measured_peak", "mfu_datasheet", "peak_memory_mib", "memory_kind",
                 "speedup_vs_hf_eager", "hours_per_1m_steps", "final_loss", "host_syncs_per_step", "host_sync_sites",
                 "profile", "step_ms")


# -- the variants --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    builder: str  # "hf", "ours_bare" or "ours_ds": which model and training step (BUILDERS)
    compile: str | None = None  # None: eager; else the torch.compile mode ("default", "reduce-overhead", ...)
    cuda_only: bool = False
    twins: bool = False  # force the kernels' PyTorch twins even where Triton runs

    @property
    def family(self) -> str:
        """Which FLOP count applies: HF's generator head runs on every position, ours on the masked ones."""
        return "hf" if self.builder == "hf" else "ours"


@dataclass
class Setup:
    """What every variant of one run shares: the model shape, the batches and the training settings."""

    config: ElectraConfig
    batch_size: int
    max_length: int
    precision: str
    device: torch.device
    batches: list[dict[str, torch.Tensor]]  # with their all-ones attention masks (what HF gets)
    our_batches: list[dict[str, torch.Tensor | None]]  # the same, as `engine.device_batch` gives them
    specials: dict[str, int]
    mlm_probability: float
    max_predictions: int
    learning_rate: float
    warmup_steps: int
    max_steps: int
    seed: int = 0
    inductor: dict[str, Any] = field(default_factory=dict)  # --inductor: our compiled variants take them as options

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return None if self.precision == "fp32" else PRECISIONS[self.precision]

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return self.batches[step % len(self.batches)]

    def our_batch(self, step: int) -> dict[str, torch.Tensor | None]:
        return self.our_batches[step % len(self.our_batches)]


@dataclass
class Runner:
    """A variant ready to time: `step(i)` runs training step i and returns its loss (a device tensor)."""

    step: Callable[[int], torch.Tensor]
    kernels: str
    notes: str
    close: Callable[[], None] | None = None  # releases what the variant holds beyond its memory


def kernel_choice(setup: Setup, variant: Variant) -> str:
    """Select the kernels for `variant`; returns its label. Compiled variants trace the twins (inductor fuses
    them) except attention and the generator head's loss and sampling, opaque ops that run the Triton kernels on
    CUDA, and the residual LayerNorms where ELECTRA_DS_COMPILED_LAYER_NORM=opaque (kernels.set_compiled_layer_norm),
    the bias + GELUs where ELECTRA_DS_COMPILED_GELU=opaque (kernels.set_compiled_gelu)."""
    triton_here = setup.device.type == "cuda" and kernels.triton_available() and not variant.twins
    backend = "triton" if triton_here else "torch"
    kernels.set_backend(backend)
    if variant.compile:
        if not triton_here:
            return "inductor"
        opaque = "".join(f"{name}, " for name, mode in (("LayerNorm", kernels.get_compiled_layer_norm()),
                                                         ("GELU", kernels.get_compiled_gelu())) if mode == "opaque")
        return f"inductor + Triton {opaque}attention, generator head"
    return backend


def masking_plan(setup: Setup, batch: dict[str, torch.Tensor | None], step: int,
                 mask_fn: Callable[..., MaskingPlan] = mask_tokens) -> tuple[MaskingPlan, torch.Tensor]:
    """The mask and the Gumbel seed of `step`, drawn exactly as `pretraining_step` draws them."""
    from electra_ds.train.pretrain import masking_inputs

    return masking_inputs(batch, vocab_size=setup.config.vocab_size, special_ids=setup.specials,
                          mlm_probability=setup.mlm_probability, max_predictions=setup.max_predictions, step=step,
                          seed=setup.seed, rank=0, mask_fn=mask_fn)


def eager_training_step(setup: Setup, forward: Callable, optimizer: torch.optim.Optimizer, variant: Variant,
                        ) -> Callable[[int], torch.Tensor]:
    """masking -> forward under autocast -> backward (GradScaler for fp16) -> clip 1.0 -> step -> schedule.
    Where `variant` compiles the model, the masking is compiled the same way. Ours get our batches
    (`device_batch`), and our optimizer clips itself."""
    from electra_ds.train.engine import linear_warmup_decay

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(setup.warmup_steps, setup.max_steps))
    scaler = torch.amp.GradScaler(setup.device.type) if setup.precision == "fp16" else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    amp = setup.amp_dtype
    ours = variant.family == "ours"
    mask_fn = mask_tokens
    if variant.compile:
        from electra_ds.train.pretrain import compiled_masking

        mask_fn = compiled_masking(variant.compile)

    def clip() -> None:
        if not ours:
            torch.nn.utils.clip_grad_norm_(params, 1.0)

    def step(i: int) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA-graph replays (no-op without them)
        batch = setup.our_batch(i) if ours else setup.batch(i)
        plan, seed = masking_plan(setup, batch, i, mask_fn)
        with torch.autocast(setup.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss = forward(batch, plan, seed)
        if scaler is None:
            loss.backward()
            clip()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            clip()
            scaler.step(optimizer)
            scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def build_hf(setup: Setup, variant: Variant) -> Runner:
    mode = variant.compile
    torch.manual_seed(setup.seed)
    model = build_hf_pair(setup.config).to(setup.device).train()
    optimizer = torch.optim.AdamW(hf_param_groups(model, 0.01), lr=setup.learning_rate, betas=(0.9, 0.999), eps=1e-6,
                                  fused=setup.device.type == "cuda" or None)
    module = torch.compile(model, mode=mode) if mode else model

    def forward(batch: dict[str, torch.Tensor], plan: MaskingPlan, seed: torch.Tensor) -> torch.Tensor:
        return module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], plan).loss

    notes = "torch AdamW " + ("fused" if setup.device.type == "cuda" else "foreach") + \
        (f", torch.compile(mode={mode!r})" if mode else "")
    return Runner(eager_training_step(setup, forward, optimizer, variant), "n/a (HF)", notes)


def build_ours_bare(setup: Setup, variant: Variant) -> Runner:
    from electra_ds.model.electra import ElectraForPretraining
    from electra_ds.train.engine import build_optimizer
    from electra_ds.train.pretrain import compile_options

    mode = variant.compile
    backend = kernel_choice(setup, variant)
    torch.manual_seed(setup.seed)
    model = ElectraForPretraining(setup.config).to(setup.device).train()
    optimizer = build_optimizer(model.param_groups(0.01), lr=setup.learning_rate, name="electra_adam",
                                max_grad_norm=1.0)  # clipping on the device, as the engine hands it over
    module = torch.compile(model, options=compile_options(mode, setup.inductor)) if mode else model

    def forward(batch: dict[str, torch.Tensor], plan: MaskingPlan, seed: torch.Tensor) -> torch.Tensor:
        return module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], plan, seed).loss

    notes = "ElectraAdam" + (f", torch.compile(mode={mode!r})" if mode else "")
    return Runner(eager_training_step(setup, forward, optimizer, variant), backend, notes)


def build_ours_ds(setup: Setup, variant: Variant) -> Runner:
    from electra_ds.model.electra import ElectraForPretraining
    from electra_ds.train import engine as ds_engine
    from electra_ds.train.pretrain import compile_engine, pretraining_step

    mode = variant.compile
    backend = kernel_choice(setup, variant)
    ds_engine.setup_distributed()
    ds_config = ds_engine.load_ds_config(setup.precision, micro_batch_size=setup.batch_size,
                                         gradient_accumulation_steps=1, world_size=1)
    torch.manual_seed(setup.seed)
    model = ElectraForPretraining(setup.config).train()
    engine = ds_engine.initialize(model, ds_config, learning_rate=setup.learning_rate,
                                  warmup_steps=setup.warmup_steps, max_steps=setup.max_steps, weight_decay=0.01,
                                  optimizer="electra_adam")
    mask_fn = compile_engine(engine, mode, setup.inductor) if mode else mask_tokens

    def step(i: int) -> torch.Tensor:
        out = pretraining_step(engine, setup.our_batch(i), special_ids=setup.specials,
                               mlm_probability=setup.mlm_probability, max_predictions=setup.max_predictions, step=i,
                               seed=setup.seed, mask_fn=mask_fn)
        return out.loss.detach()

    clipping = "ElectraAdam, clipping on the device" if engine.basic_optimizer.max_grad_norm else \
        "ElectraAdam, DeepSpeed's clipping"
    notes = f"DeepSpeed ds_configs/{setup.precision}.json ({ds_engine.precision(ds_config)}), {clipping}" + \
        (f", engine.compile(mode={mode!r})" if mode else "")
    return Runner(step, backend, notes, engine.destroy)


BUILDERS: dict[str, Callable[[Setup, Variant], Runner]] = {
    "hf": build_hf, "ours_bare": build_ours_bare, "ours_ds": build_ours_ds}
CUDA_GRAPHS = "reduce-overhead"
VARIANTS = (
    Variant("hf_eager", "HF modules (seed wiring), eager, torch AdamW", "hf"),
    Variant("ours_ds_triton", "ours, DeepSpeed engine, Triton kernels", "ours_ds", cuda_only=True),
    Variant("ours_ds_torch", "ours, DeepSpeed engine, PyTorch twins", "ours_ds", twins=True),
    Variant("ours_bare", "ours, bare model step + ElectraAdam (no DeepSpeed)", "ours_bare"),
    Variant("ours_compile", "ours, bare step, torch.compile", "ours_bare", compile="default"),
    Variant("ours_compile_cudagraphs", "ours, bare step, torch.compile reduce-overhead (CUDA graphs)", "ours_bare",
            compile=CUDA_GRAPHS, cuda_only=True),
    Variant("ours_ds_compile_cudagraphs", "ours, DeepSpeed engine, engine.compile reduce-overhead (CUDA graphs)",
            "ours_ds", compile=CUDA_GRAPHS, cuda_only=True),
    Variant("ours_ds_compile_max_autotune", "ours, DeepSpeed engine, engine.compile max-autotune (autotuned matrix "
            "products with fused epilogues, CUDA graphs)", "ours_ds", compile="max-autotune", cuda_only=True),
    Variant("hf_compile", "HF modules, torch.compile", "hf", compile="default"),
    Variant("hf_compile_cudagraphs", "HF modules, torch.compile reduce-overhead (CUDA graphs)", "hf",
            compile=CUDA_GRAPHS, cuda_only=True),
)
VARIANT_NAMES = tuple(v.name for v in VARIANTS)


# -- measuring -----------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[int], torch.Tensor], device: torch.device, warmup: int,
               steps: int) -> tuple[list[float], float, float, torch.Tensor]:
    """(per-step ms, wall ms per step over the timed steps, warm-up seconds, last loss)."""
    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    loss = torch.zeros(())
    if device.type == "cuda":
        begins = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        for k in range(steps):
            begins[k].record()
            loss = step(warmup + k)
            ends[k].record()
        torch.cuda.synchronize(device)
        times = [b.elapsed_time(e) for b, e in zip(begins, ends)]
        wall = begins[0].elapsed_time(ends[-1]) / steps
    else:
        times, first = [], time.perf_counter()
        for k in range(steps):
            t = time.perf_counter()
            loss = step(warmup + k)
            times.append((time.perf_counter() - t) * 1e3)
        wall = (time.perf_counter() - first) * 1e3 / steps
    return times, wall, warmup_s, loss


SYNC_WARNING = "called a synchronizing CUDA operation"  # c10's warning at each sync under sync debug mode "warn"


def sync_sites(caught: list[warnings.WarningMessage]) -> dict[str, int]:
    """"file:line" -> count of the host synchronisations among warnings caught under sync debug mode "warn". Only
    c10's sync warning counts: turning the mode on warns once per process that it is a prototype ("Synchronization
    debug mode is a prototype feature ..."), which is no sync."""
    return dict(collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message)))


def count_host_syncs(step: Callable[[int], torch.Tensor], index: int, device: torch.device,
                     variant: Variant) -> dict[str, int] | None:
    """Host synchronisations in step `index` by call site ("file:line" -> count): on a GPU from
    torch.cuda.set_sync_debug_mode's warnings (each names the Python line that caused it). On the CPU,
    `SyncCounter` for our eager variants; None for compiled ones (it cannot see traced code) and for HF's,
    whose optimizer reads step counters that a GPU run keeps on the host (no sync there, a false count here)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(index)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sync_sites(caught)
    if variant.compile or variant.family != "ours":
        return None
    with SyncCounter(ignore=("check_token_ids",)) as syncs:  # the model's id check runs for CPU tensors only
        step(index)
    return dict(syncs.sites)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def reset_peak_memory(device: torch.device) -> str:
    """Start a fresh peak; returns what the peak measures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return "peak RSS of this variant (VmHWM)"
    except OSError:
        return "peak RSS of the process so far (ru_maxrss)"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def matmul_peak(device: torch.device) -> dict[str, Any]:
    """bf16 n x n x n matrix-product rate on this device (8192 on CUDA, 1024 on CPU)."""
    n, iters = (8192, 20) if device.type == "cuda" else (1024, 3)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        seconds = begin.elapsed_time(end) / 1e3
    else:
        for _ in range(iters):
            a @ b
        seconds = time.perf_counter() - start
    return {"shape": f"{n}x{n}x{n} bf16", "tflops": 2 * n ** 3 * iters / seconds / 1e12}


def datasheet_peak(device_name: str) -> tuple[str, float | None]:
    for key, label, tflops in DATASHEET_BF16_TFLOPS:
        if key in device_name:
            return label, tflops
    return "unknown", None


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                            platform.machine() or "cpu")
    return {"device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": package_version("transformers"), "deepspeed": package_version("deepspeed"),
            "triton": package_version("triton"), "kernels_default_backend": kernels.get_backend(),
            "code": code_version()}


def code_version() -> str | None:
    """The commit the benchmark ran (with "+changes" when the tree differs from it); None outside a git clone."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if dirty else "")


# -- one run (batch size) ------------------------------------------------------------------------------------

def make_setup(args: argparse.Namespace, batch_size: int, device: torch.device) -> Setup:
    config = preset(args.model_size)
    recipe = RECIPES[args.model_size]
    specials = special_token_ids(config.vocab_size)
    g = torch.Generator().manual_seed(args.seed)
    batches, our_batches = [], []
    for _ in range(args.num_batches):
        input_ids, attention_mask = random_batch(config.vocab_size, batch_size, args.max_length, specials, g)
        host = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}
        batches.append({k: v.to(device) for k, v in host.items()})
        our_batches.append(device_batch(host, device))
    mlm = recipe["mlm_probability"]
    return Setup(config=config, batch_size=batch_size, max_length=args.max_length,
                 precision=args.precision, device=device, batches=batches, our_batches=our_batches,
                 specials=specials, mlm_probability=mlm,
                 max_predictions=max_predictions(args.max_length, mlm), learning_rate=recipe["learning_rate"],
                 warmup_steps=recipe["warmup_steps"], max_steps=recipe["max_steps"], seed=args.seed,
                 inductor=dict(args.inductor))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(setup: Setup, variant: Variant, *, warmup: int, steps: int, peak_tflops: float,
                datasheet_tflops: float | None, profile_steps: int = 0) -> dict[str, Any]:
    """Build, warm up and time one variant; every number of its JSON record."""
    tokens = setup.batch_size * setup.max_length
    flops = executed_step_flops(setup.config, setup.batch_size, setup.max_length,
                                setup.max_length if variant.family == "hf" else setup.max_predictions)
    record = new_record(variant, "ok", None)
    record["executed_flops_per_step"] = flops
    memory_kind = reset_peak_memory(setup.device)
    previous_backend = kernels.get_backend()
    runner = None
    generated = len(PyCodeCache.modules)  # inductor's modules loaded before this variant's compile
    try:
        start = time.perf_counter()
        runner = BUILDERS[variant.builder](setup, variant)
        build_s = time.perf_counter() - start
        times, wall, warmup_s, loss = time_steps(runner.step, setup.device, warmup, steps)
        final_loss = float(loss)  # now: a CUDA-graph replay below would overwrite the loss's static buffer
        sync_sites = count_host_syncs(runner.step, warmup + steps, setup.device, variant)
        profile = (step_profile.profile_steps(runner.step, warmup + steps + 1, profile_steps, setup.device)
                   if profile_steps else None)
        if profile and profile["gpu_busy_ms_per_step"] is not None:
            gigabytes = step_profile.generated_kernel_gigabytes(PyCodeCache.modules[generated:])
            step_profile.add_bandwidth(profile, gigabytes)
        median = statistics.median(times)
        tflops = flops / (median / 1e3) / 1e12
        notes = runner.notes if math.isfinite(final_loss) else f"{runner.notes}; final loss {final_loss}"
        record.update({
            "kernels": runner.kernels, "notes": notes, "build_s": build_s, "warmup_s": warmup_s,
            "ms_per_step": median, "ms_p10": percentile(times, 10), "ms_p90": percentile(times, 90),
            "ms_wall_mean": wall, "tokens_per_s": tokens / (median / 1e3), "tflops": tflops,
            "mfu_measured_peak": tflops / peak_tflops,
            "mfu_datasheet": tflops / datasheet_tflops if datasheet_tflops else None,
            "peak_memory_mib": peak_memory_bytes(setup.device) / 2 ** 20, "memory_kind": memory_kind,
            "hours_per_1m_steps": median * SPEED_OF_RECIPE_STEPS / 3.6e6,
            "final_loss": final_loss if math.isfinite(final_loss) else None,
            "host_syncs_per_step": None if sync_sites is None else sum(sync_sites.values()),
            "host_sync_sites": sync_sites, "profile": profile, "step_ms": times})
    except Exception as e:  # one variant failing must not lose the others' numbers
        record.update(status="error", error=f"{type(e).__name__}: {e}"[:ERROR_CHARS],
                      traceback=traceback.format_exc()[-ERROR_CHARS:])
    finally:
        if runner is not None and runner.close is not None:
            try:
                runner.close()
            except Exception as e:  # noqa: BLE001 - a failed clean-up must not stop the next variants
                print(f"[throughput] {variant.name}: clean-up failed: {e}", file=sys.stderr)
        del runner
        kernels.set_backend(previous_backend)
        if variant.compile:
            torch._dynamo.reset()
        free_memory(setup.device)
    return record


def new_record(variant: Variant, status: str, error: str | None) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(name=variant.name, description=variant.description, status=status, error=error)
    return record


def add_comparisons(run: dict[str, Any]) -> None:
    """Speed-up of every variant over hf_eager, and the DeepSpeed engine's cost over the bare step with the same
    kernels (DESIGN.md section 4 wants it under 1 ms)."""
    done = {v["name"]: v for v in run["variants"] if v["status"] == "ok"}
    base = done.get("hf_eager")
    for v in run["variants"]:
        v["speedup_vs_hf_eager"] = base["ms_per_step"] / v["ms_per_step"] if base and v["name"] in done else None
    pairs = (("ours_ds_triton", "ours_bare"), ("ours_ds_torch", "ours_bare"),
             ("ours_ds_compile_cudagraphs", "ours_compile_cudagraphs"))
    run["engine_overhead_ms"] = {engine: done[engine]["ms_per_step"] - done[bare]["ms_per_step"]
                                 for engine, bare in pairs
                                 if engine in done and bare in done
                                 and done[engine]["kernels"] == done[bare]["kernels"]}
    # The training path's best: the fastest step through the DeepSpeed engine, against both HF baselines.
    engine_steps = [v for name, v in done.items() if name.startswith("ours_ds_")]
    best = min(engine_steps, key=lambda v: v["ms_per_step"], default=None)
    run["fastest_engine_step"] = None if best is None else {
        "name": best["name"], "ms_per_step": best["ms_per_step"],
        **{f"x_{hf}": done[hf]["ms_per_step"] / best["ms_per_step"] if hf in done else None
           for hf in ("hf_eager", "hf_compile_cudagraphs")}}


# -- output --------------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else format(value * scale, spec) + suffix


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    env = meta["environment"]
    lines = [f"ELECTRA-{meta['model_size']} training step, {meta['precision']}, seq {meta['max_length']} "
             f"(max_predictions {meta['max_predictions']}), on {env['device_name']} ({env['device']}); "
             f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']}, "
             f"deepspeed {env['deepspeed']}, triton {env['triton']}; code {env.get('code') or 'unknown'}.",
             f"Measured peak: {meta['matmul_peak']['shape']} at {meta['matmul_peak']['tflops']:.1f} TFLOP/s; "
             f"datasheet: {meta['datasheet_peak']['name']}"
             + (f" {meta['datasheet_peak']['tflops']:.0f} TFLOP/s" if meta['datasheet_peak']['tflops'] else "")
             + f". Recipe ({meta['recipe']['steps']:,} steps of {meta['recipe']['batch_size']} x "
             f"{meta['recipe']['max_length']}): {meta['recipe']['pfs_days']:.4g} pfs-days (paper convention)."
             + (f" Inductor settings of the compiled variants: {meta['inductor']}." if meta.get("inductor") else "")
             + (f" Our compiled variants' defaults: {meta['compile_defaults']}." if meta.get("compile_defaults")
                else "")
             + (" Residual LayerNorms under compile: opaque (our kernels)."
                if meta.get("compiled_layer_norm") == "opaque" else "")
             + (" Bias + GELU under compile: opaque (our kernels)." if meta.get("compiled_gelu") == "opaque" else ""),
             "",
             "| batch | variant | kernels | ms/step | p10-p90 | tokens/s | TFLOP/s | MFU (measured) | MFU (datasheet) "
             "| peak MiB | x HF eager | h / 1M steps | host syncs/step |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        for v in run["variants"]:
            if v["status"] != "ok":
                reason = (v.get("error") or "").splitlines()[0][:90] if v.get("error") else ""
                lines.append(f"| {run['batch_size']} | {v['name']} | | {v['status']} | {reason} | | | | | | | | |")
                continue
            lines.append(
                f"| {run['batch_size']} | {v['name']} | {v['kernels']} | {v['ms_per_step']:.2f} "
                f"| {v['ms_p10']:.2f}-{v['ms_p90']:.2f} | {v['tokens_per_s']:,.0f} | {v['tflops']:.3g} "
                f"| {100 * v['mfu_measured_peak']:.3g}% | {fmt(v['mfu_datasheet'], '.3g', 100, '%')} "
                f"| {v['peak_memory_mib']:,.0f} "
                f"| {fmt(v['speedup_vs_hf_eager'], '.2f')} | {v['hours_per_1m_steps']:.1f} "
                f"| {fmt(v['host_syncs_per_step'], '.0f')} |")
    overheads = [f"Batch {run['batch_size']}: DeepSpeed engine cost, {name} minus the same step without the engine: "
                 f"{ms:+.2f} ms/step" + (" (below zero: the two medians' noise exceeds the cost)." if ms < 0 else ".")
                 for run in result["runs"] for name, ms in run["engine_overhead_ms"].items()]
    overheads += [f"Batch {run['batch_size']}: fastest step through the DeepSpeed engine: {best['name']}, "
                  f"{best['ms_per_step']:.2f} ms; {fmt(best['x_hf_eager'], '.2f', suffix='x')} HF eager, "
                  f"{fmt(best['x_hf_compile_cudagraphs'], '.2f', suffix='x')} HF with CUDA graphs."
                  for run in result["runs"] if (best := run.get("fastest_engine_step"))]
    overheads += [f"Batch {run['batch_size']}: {v['name']}'s host syncs at "
                  + ", ".join(f"{site} ({n}x)" for site, n in v["host_sync_sites"].items()) + "."
                  for run in result["runs"] for v in run["variants"] if v.get("host_sync_sites")]
    profiles = [f"\nBatch {run['batch_size']}, " + step_profile.markdown(v["name"], v["ms_per_step"], v["profile"])
                for run in result["runs"] for v in run["variants"] if v.get("profile")]
    return "\n".join(lines + [""] * bool(overheads) + overheads + profiles)


# -- command line --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_size", choices=sorted(PRESETS), help="default: small on CUDA, tiny on the CPU")
    p.add_argument("--batch_size", type=int, help="default: 128 on CUDA, 8 on the CPU")
    p.add_argument("--batch_sizes", help="comma-separated batch sizes to sweep (overrides --batch_size)")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS))
    p.add_argument("--steps", type=int, help="timed steps (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int,
                   help="untimed steps first, compilation included (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--variants", default=",".join(VARIANT_NAMES),
                   help=f"comma-separated, run in this order; of {', '.join(VARIANT_NAMES)}")
    p.add_argument("--json", type=Path, help="write the results here (rewritten after every variant)")
    p.add_argument("--markdown", type=Path, help="write the table here too (rewritten after every variant)")
    p.add_argument("--max_seconds", type=float,
                   help="start no variant after this many seconds; the rest are recorded as skipped")
    p.add_argument("--num_batches", type=int, default=4, help="distinct batches the steps cycle through")
    p.add_argument("--profile_steps", type=int, default=0,
                   help="after timing, profile this many more steps of each variant (benchmarks/step_profile.py): "
                        "GPU busy time per step and the top kernels")
    p.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="a torch._inductor.config setting (repeatable), as pretrain.py's --inductor, for every "
                        "compiled variant: ours and the Hugging Face baselines alike (ours take pretrain.py's "
                        "COMPILE_DEFAULTS first, the baselines torch's defaults)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_check", action="store_true",
                   help="skip the check that the HF wiring computes our losses (check_same_loss)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cpu" and (args.model_size is None or args.batch_size is None and not args.batch_sizes):
        print("[throughput] CPU: the tiny preset and batch 8 unless --model_size / --batch_size say otherwise "
              "(ELECTRA-Small at batch 128 takes minutes per variant on a few cores)", file=sys.stderr)
    args.model_size = args.model_size or ("small" if args.device == "cuda" else "tiny")
    args.batch_size = args.batch_size or (128 if args.device == "cuda" else 8)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANT_NAMES]
    if unknown or not names:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANT_NAMES)}")
    args.variant_list = [v for n in names for v in VARIANTS if v.name == n]
    try:
        args.batch_list = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size]
    except ValueError:
        p.error(f"--batch_sizes {args.batch_sizes!r}: expected comma-separated integers")
    if min(args.batch_list) < 1 or args.max_length < 2:
        p.error("batch sizes must be >= 1 and --max_length >= 2")
    if args.max_length > preset(args.model_size).max_position_embeddings:
        p.error(f"--max_length {args.max_length} exceeds the {args.model_size} preset's max_position_embeddings")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    steps = args.steps if args.steps is not None else (50 if cuda else 5)
    if steps < 1 or warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    inductor = dict(args.inductor)
    apply_inductor_settings(inductor)  # process-wide: every compile below sees them
    kernel_bytes = cuda and args.profile_steps > 0
    if kernel_bytes:  # metadata only: each generated kernel's bytes estimate, for the profile's bandwidth figures
        import torch._inductor.config as inductor_config

        inductor_config.benchmark_kernel = True
    config = preset(args.model_size)
    recipe = RECIPES[args.model_size]
    env = environment(device)
    sheet_name, sheet_tflops = datasheet_peak(env["device_name"])
    peak = matmul_peak(device)
    mlm = recipe["mlm_probability"]
    meta: dict[str, Any] = {
        "model_size": args.model_size, "precision": args.precision, "max_length": args.max_length,
        "max_predictions": max_predictions(args.max_length, mlm), "mlm_probability": mlm, "steps": steps,
        "warmup": warmup, "environment": env, "matmul_peak": peak,
        "datasheet_peak": {"name": sheet_name, "tflops": sheet_tflops},
        "recipe": {"steps": recipe["max_steps"], "batch_size": recipe["batch_size"],
                   "max_length": recipe["max_length"],
                   "pfs_days": recipe_flops(config, recipe["batch_size"], recipe["max_length"],
                                            recipe["max_steps"]).pfs_days},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv if argv is None else argv,
        "inductor": inductor, "compile_defaults": COMPILE_DEFAULTS, "kernel_bytes_estimated": kernel_bytes,
        "compiled_layer_norm": kernels.get_compiled_layer_norm(), "compiled_gelu": kernels.get_compiled_gelu(),
    }
    result: dict[str, Any] = {"meta": meta, "runs": []}
    if not args.no_check:
        try:
            check = check_same_loss(config)
            meta["fair_check"] = {"ok": True, **vars(check), "max_abs_diff": check.max_abs_diff}
        except AssertionError as e:
            meta["fair_check"] = {"ok": False, "error": str(e)}
            print(f"WARNING: {e}", file=sys.stderr)

    for batch_size in args.batch_list:
        setup = make_setup(args, batch_size, device)
        run: dict[str, Any] = {"batch_size": batch_size, "max_length": args.max_length,
                               "tokens_per_step": batch_size * args.max_length,
                               "pfs_days_per_1m_steps": recipe_flops(config, batch_size, args.max_length,
                                                                     SPEED_OF_RECIPE_STEPS).pfs_days,
                               "variants": [], "engine_overhead_ms": {}}
        result["runs"].append(run)
        for variant in args.variant_list:
            if variant.cuda_only and not cuda:
                record = new_record(variant, "skipped", "needs CUDA")
            elif args.max_seconds is not None and time.monotonic() - t0 > args.max_seconds:
                record = new_record(variant, "skipped", f"time budget of {args.max_seconds:g} s spent")
            else:
                print(f"[throughput] batch {batch_size}: {variant.name} ...", file=sys.stderr, flush=True)
                record = run_variant(setup, variant, warmup=warmup, steps=steps, peak_tflops=peak["tflops"],
                                     datasheet_tflops=sheet_tflops, profile_steps=args.profile_steps)
                summary = f"{record['ms_per_step']:.2f} ms/step" if record["status"] == "ok" else record["error"]
                print(f"[throughput] batch {batch_size}: {variant.name}: {summary}", file=sys.stderr, flush=True)
            run["variants"].append(record)
            add_comparisons(run)
            meta["elapsed_s"] = time.monotonic() - t0
            if args.json:
                atomic_write(args.json, json.dumps(result, indent=2) + "\n")
            if args.markdown:
                atomic_write(args.markdown, markdown(result) + "\n")
        del setup
        free_memory(device)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
