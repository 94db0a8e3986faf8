"""DeepSpeed set-up: the distributed world, the JSON config, the optimizer, the schedule and the engine.

Precision, ZeRO stage and offload come from the DeepSpeed JSON only (`ds_configs/*.json`); the optimizer,
learning-rate schedule and batch sizes come from the command line and are filled into the JSON here.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from electra_ds.train.optim import ElectraAdam

log = logging.getLogger(__name__)

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
OPTIMIZERS = ("auto", "electra_adam", "adamw", "fused_adam", "cpu_adam")

# Top-level keys DeepSpeed 0.19 reads (https://www.deepspeed.ai/docs/config-json/). DeepSpeed itself ignores
# unknown top-level keys, so a misspelt "zero_optimisation" would silently run without ZeRO: we refuse it.
# Keys inside sections are checked by DeepSpeed's own (pydantic) models.
KNOWN_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "wall_clock_breakdown", "dump_state", "prescale_gradients", "gradient_predivide_factor", "gradient_clipping",
    "gradient_allreduce_op", "sparse_gradients", "communication_data_type", "seq_parallel_communication_data_type",
    "disable_allgather", "disable_python_gc", "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "data_types",
    "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "autotuning", "elasticity",
    "data_efficiency", "curriculum_learning", "checkpoint", "pipeline", "sparse_attention", "memory_breakdown",
    "eigenvalue", "progressive_layer_drop", "compression_training", "quantize_training", "weight_quantization",
    "nebula", "dataloader_drop_last", "load_universal_checkpoint", "use_node_local_storage", "hybrid_engine",
    "graph_harvesting", "compile", "timers", "aio", "use_data_before_expert_parallelism", "sequence_parallel_size",
    "tensor_parallel", "managed_gradient_accumulation", "log_level", "legacy_fusion", "optimizer", "scheduler",
})


# DeepSpeed's pydantic model -> the JSON section it parses (to name the key in full).
PYDANTIC_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedFP16Config": "fp16",
                     "DeepSpeedBF16Config": "bf16", "CommsLoggerConfig": "comms_logger",
                     "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
                     "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param"}


class DSConfigError(ValueError):
    """A DeepSpeed JSON that cannot be used, with the file and key named."""


# -- distributed world ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as the launcher (deepspeed, torchrun) set them; (0, 1, 0) for plain python."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def setup_distributed(timeout_s: float = 600.0) -> tuple[int, int, int]:
    """Join the process group the launcher describes, or make a one-process world when run with plain python.

    `timeout_s` bounds every collective: a rank that dies or hangs makes the others fail within it instead of
    waiting forever. Returns (rank, world_size, local_rank).
    """
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    rank, world_size, local_rank = world_from_env()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s), verbose=False)
    return rank, world_size, local_rank


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def device_batch(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor | None]:
    """A host batch on `device` (asynchronous from pinned memory). An attention mask of all ones, checked on the
    host before the copy, becomes None: attention then reads no mask, same results."""
    full = "attention_mask" in batch and bool(batch["attention_mask"].all())
    return {k: None if (k == "attention_mask" and full) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def quiet_deepspeed() -> None:
    """DeepSpeed logs every engine detail at INFO; keep warnings and errors."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


# -- the JSON ------------------------------------------------------------------------------------------------

def default_ds_config() -> Path:
    """bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU."""
    if torch.cuda.is_available():
        return DS_CONFIG_DIR / ("bf16.json" if torch.cuda.is_bf16_supported() else "fp16.json")
    return DS_CONFIG_DIR / "fp32.json"


def resolve_ds_config(name: str | os.PathLike | None) -> Path:
    """A path, or the name of a shipped config ("bf16_zero2" -> ds_configs/bf16_zero2.json); None -> default."""
    if name is None or str(name) == "auto":
        return default_ds_config()
    path = Path(name)
    if path.is_file():
        return path
    shipped = DS_CONFIG_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    choices = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise DSConfigError(f"DeepSpeed config {name!r}: no such file, and not a shipped config name ({choices})")


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise DSConfigError(f"cannot read DeepSpeed config {path}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DSConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise DSConfigError(f"{path}: a DeepSpeed config must be a JSON object, got {type(data).__name__}")
    return data


def _strip_comments(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_comments(v) for k, v in value.items() if not str(k).startswith("_")}
    return value


def _find_auto(value: Any, where: str) -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _find_auto(v, f"{where}.{k}" if where else k)]
    return [where] if value == "auto" else []


def load_ds_config(path_or_dict: str | os.PathLike | dict, *, micro_batch_size: int, gradient_accumulation_steps: int,
                   world_size: int, flags: dict[str, str] | None = None) -> dict:
    """Read a DeepSpeed JSON (a path, a shipped config name, or a dict), check it and fill in the batch sizes.

    Batch sizes: `train_micro_batch_size_per_gpu`, `gradient_accumulation_steps` and `train_batch_size` may be
    `"auto"` (as in the shipped `ds_configs/*.json`) or absent, and are then filled from the command line
    (`--per_device_train_batch_size`, `--gradient_accumulation_steps`, and their product with the world size).
    A number there must equal what the command line gives, or this raises `DSConfigError` saying which.
    No other value may be "auto". `flags` names the command-line flags behind each batch key in those errors
    (default: launch/pretrain.py's).

    Keys: keys starting with "_" are comments and are dropped. An unknown top-level key, or an unknown or
    ill-typed key inside a section (DeepSpeed's own validation), raises `DSConfigError` naming the key.
    "optimizer" and "scheduler" sections are refused: the optimizer and the schedule come from our flags.
    "managed_gradient_accumulation": false is refused: our loops leave the accumulation boundary to DeepSpeed.
    fp16 without ZeRO is refused (a DeepSpeed 0.19 bug leaves its loss unscaled; see the error message).
    With ZeRO, `zero_allow_untested_optimizer` defaults to true, since our optimizer is a client optimizer.
    DeepSpeed's throughput timer is off unless the JSON has a "timers" section: by default it synchronises the
    device twice a step to time it, and our loop measures tokens/s itself.
    """
    if isinstance(path_or_dict, dict):
        source, raw = "DeepSpeed config", dict(path_or_dict)
    else:
        path = resolve_ds_config(path_or_dict)
        source, raw = str(path), _read_json(path)
    config = _strip_comments(raw)

    unknown = sorted(k for k in config if k not in KNOWN_KEYS)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(KNOWN_KEYS), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise DSConfigError(f"{source}: unknown key(s) {', '.join(hints)}")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise DSConfigError(f"{source}: remove the {key!r} section; the optimizer and learning-rate schedule "
                                "come from the command line")
    if config.get("managed_gradient_accumulation", True) is not True:
        raise DSConfigError(f"{source}: remove \"managed_gradient_accumulation\": "
                            f"{json.dumps(config['managed_gradient_accumulation'])}; it makes every engine.step() "
                            "an optimizer step (the caller would have to mark the accumulation boundaries, which our "
                            "loops do not), so with --gradient_accumulation_steps N each update would use one "
                            "micro-batch's loss divided by N")

    for name, value in (("micro batch size", micro_batch_size), ("gradient_accumulation_steps",
                                                                 gradient_accumulation_steps),
                        ("world size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise DSConfigError(f"{name} must be a positive integer, got {value!r}")
    wanted = {"train_micro_batch_size_per_gpu": micro_batch_size,
              "gradient_accumulation_steps": gradient_accumulation_steps,
              "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size}
    flags = flags or {"train_micro_batch_size_per_gpu": "--per_device_train_batch_size",
                      "gradient_accumulation_steps": "--gradient_accumulation_steps",
                      "train_batch_size": "--per_device_train_batch_size x --gradient_accumulation_steps x world "
                                          f"size ({micro_batch_size} x {gradient_accumulation_steps} x {world_size})"}
    for key in BATCH_KEYS:
        given = config.get(key, "auto")
        if given != "auto" and given != wanted[key]:
            raise DSConfigError(f"{source}: {key} is {given!r} but the command line gives {wanted[key]} "
                                f"({flags[key]}); set it to \"auto\" or make them agree")
        config[key] = wanted[key]

    left = _find_auto(config, "")
    if left:
        raise DSConfigError(f"{source}: {', '.join(left)}: \"auto\" is only understood for {', '.join(BATCH_KEYS)}")
    _validate_with_deepspeed(config, source)
    if precision(config) == "fp16" and zero_stage(config) == 0:
        raise DSConfigError(f"{source}: fp16 needs zero_optimization.stage >= 1: without ZeRO, DeepSpeed 0.19 never "
                            "scales the loss but still divides the gradients by the loss scale (deepspeedai/DeepSpeed "
                            "PR 8393), so training would stall; ds_configs/fp16.json uses stage 1")
    if zero_stage(config) > 0:
        config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("timers", {"throughput": {"enabled": False}})
    return config


def _validate_with_deepspeed(config: dict, source: str) -> None:
    """Let DeepSpeed parse every section now, so a bad key fails here, named, before any model is built."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    probe = {k: v for k, v in config.items() if k != "train_batch_size"}  # DeepSpeed recomputes it per world
    try:
        DeepSpeedConfig(probe)
    except ValidationError as e:
        section = PYDANTIC_SECTIONS.get(e.title, "")
        keys = "; ".join(".".join([section] * bool(section) + [str(p) for p in err["loc"]]) + f" ({err['msg']})"
                         for err in e.errors())
        raise DSConfigError(f"{source}: invalid key {keys}") from None
    except (AssertionError, ValueError, TypeError, KeyError) as e:
        raise DSConfigError(f"{source}: DeepSpeed rejects this config: {e}") from None


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def precision(config: dict) -> str:
    """"fp16", "bf16" (DeepSpeed's low-precision weights), "bf16 autocast"/"fp16 autocast" (fp32 weights,
    torch.autocast), or "fp32"."""
    if config.get("fp16", {}).get("enabled"):
        return "fp16"
    if config.get("bf16", config.get("bfloat16", {})).get("enabled"):
        return "bf16"
    autocast = config.get("torch_autocast", {})
    if autocast.get("enabled"):
        return ("fp16" if str(autocast.get("dtype", "bfloat16")) in ("fp16", "float16", "torch.float16") else
                "bf16") + " autocast"
    return "fp32"


def check_precision_supported(config: dict) -> None:
    """Raise DSConfigError when DeepSpeed's accelerator on this machine cannot run the config's fp16 or bf16 weights
    (a CPU whose oneDNN lacks fp16, for one), instead of failing inside deepspeed.initialize."""
    from deepspeed.accelerator import get_accelerator

    name = precision(config)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(name)
    accelerator = get_accelerator()
    supported = accelerator.supported_dtypes()
    if dtype is not None and dtype not in supported:
        instead = [f"{n}.json" for n, d in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if d in supported]
        raise DSConfigError(f"{name} weights are not supported by DeepSpeed's {accelerator.device_name()} accelerator "
                            f"on this machine; use a config without them, e.g. {' or '.join(instead + ['fp32.json'])}")


def fp32_weights(precision_name: str) -> bool:
    """Whether a `precision` name trains fp32 weights (fp32, or torch autocast) rather than DeepSpeed's fp16/bf16
    weight copies and their optimizer wrapper."""
    return precision_name == "fp32" or precision_name.endswith(" autocast")


def runs_client_optimizer(config: dict) -> bool:
    """True where DeepSpeed steps our optimizer on the full fp32 parameters and gradients itself (no ZeRO and
    no fp16/bf16 wrapper): the optimizer then sees the whole (all-reduced) gradient and may clip it."""
    return zero_stage(config) == 0 and precision(config) in ("fp32", "bf16 autocast")


def offloads_optimizer(config: dict) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


# -- optimizer and schedule ----------------------------------------------------------------------------------

def build_optimizer(param_groups: list[dict], *, lr: float, name: str = "electra_adam",
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                    max_grad_norm: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (each with its own "weight_decay", and optionally "lr").

    electra_adam: ours, Adam without bias correction, decoupled weight decay (the faithful recipe).
    fused_adam:   DeepSpeed FusedAdam(bias_correction=False, adam_w_mode=True) (CUDA; builds the op).
    cpu_adam:     DeepSpeed DeepSpeedCPUAdam(bias_correction=False, adamw_mode=True), for ZeRO-Offload.
    adamw:        torch AdamW (fused on CUDA); note it applies bias correction, unlike the recipe.
    `max_grad_norm` > 0 (electra_adam only): clip by the global gradient norm inside the step, on the device.
    """
    if max_grad_norm and name != "electra_adam":
        raise ValueError(f"only electra_adam clips inside its step, not {name}")
    if name == "electra_adam":
        return ElectraAdam(param_groups, lr=lr, betas=betas, eps=eps, max_grad_norm=max_grad_norm)
    if name == "adamw":
        on_cuda = all(p.is_cuda for g in param_groups for p in g["params"])
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=on_cuda or None)
    if name == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(param_groups, lr=lr, betas=betas, eps=eps, bias_correction=False, adam_w_mode=True)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, eps=eps, bias_correction=False, adamw_mode=True)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS[1:]}")


def resolve_optimizer(name: str, ds_config: dict) -> str:
    """"auto" -> cpu_adam under ZeRO-Offload (DeepSpeed wants its CPU Adam there), else electra_adam."""
    if name == "auto":
        return "cpu_adam" if offloads_optimizer(ds_config) else "electra_adam"
    if offloads_optimizer(ds_config) and name != "cpu_adam":
        raise DSConfigError(f"the DeepSpeed config offloads the optimizer to CPU, which needs --optimizer cpu_adam "
                            f"(or auto), not {name}")
    return name


def linear_warmup_decay(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup multiplying a linear decay to 0 (google-research/electra).

    factor(step) = min(1, step / warmup_steps) * max(0, 1 - step / max_steps).
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        warm = min(1.0, step / warmup_steps) if warmup_steps else 1.0
        return warm * max(0.0, 1.0 - step / max_steps)

    return factor


def initialize(model: torch.nn.Module, ds_config: dict, *, learning_rate: float, warmup_steps: int, max_steps: int,
               weight_decay: float = 0.01, optimizer: str = "auto", param_groups: list[dict] | None = None,
               eps: float = 1e-6):
    """The DeepSpeed engine over `model` (which must offer `param_groups(weight_decay)`), with our optimizer,
    the warmup x linear-decay schedule, and everything else from `ds_config` (see `load_ds_config`).
    `param_groups` replaces the model's groups (e.g. with a learning rate per group for fine-tuning)."""
    import deepspeed

    quiet_deepspeed()
    check_precision_supported(ds_config)
    name = resolve_optimizer(optimizer, ds_config)
    model.to(device())
    groups = model.param_groups(weight_decay) if param_groups is None else param_groups
    clip = float(ds_config.get("gradient_clipping", 0.0))
    clip_in_optimizer = name == "electra_adam" and clip > 0 and runs_client_optimizer(ds_config)
    if clip_in_optimizer:  # the same clipping, on the device: DeepSpeed's reads the norm on the host every step
        ds_config = {**ds_config, "gradient_clipping": 0.0}
    opt = build_optimizer(groups, lr=learning_rate, name=name, eps=eps,
                          max_grad_norm=clip if clip_in_optimizer else 0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(warmup_steps, max_steps))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedule, config=ds_config)
    if zero_stage(ds_config) == 0 and engine.dp_world_size == 1:
        # Without ZeRO, DeepSpeed all-reduces the gradients even across one rank: a flatten, a collective and a
        # copy back per step that change nothing.
        engine.enable_backward_allreduce = False
    return engine


__all__ = ["DSConfigError", "DS_CONFIG_DIR", "OPTIMIZERS", "build_optimizer", "check_precision_supported",
           "default_ds_config", "device", "device_batch", "fp32_weights", "free_port", "initialize",
           "linear_warmup_decay", "load_ds_config", "offloads_optimizer", "precision", "quiet_deepspeed",
           "resolve_ds_config", "resolve_optimizer", "runs_client_optimizer", "setup_distributed", "world_from_env",
           "zero_stage"]
