"""Find the host synchronisations in a piece of training code, on any device.

On a GPU the host queues kernels and runs ahead; reading a tensor's value on the host (`.item()`, `bool(t)`,
`float(t)`, `.tolist()`, `.cpu()`, `nonzero`) or copying host data into a new device tensor
(`torch.tensor(x, device=...)`) makes it wait until every queued kernel has finished, and the GPU then idles
while the host queues the next ones. `SyncCounter` counts such calls through a TorchFunctionMode, so it finds
them in a CPU run too, and names each call site (the innermost frame outside torch). It also counts explicit
device synchronisations through DeepSpeed's accelerator (`get_accelerator().synchronize()`, a no-op on the CPU
but a full wait on a GPU), when DeepSpeed is loaded.

    with SyncCounter() as syncs:
        pretraining_step(engine, batch, ...)
    syncs.sites  # Counter({"deepspeed/runtime/utils.py:323 (has_overflow)": 1, ...})

`python -m electra_ds.host_sync --deepspeed_config bf16_zero2` counts them in a few pretraining steps of the
tiny preset through the DeepSpeed engine with that config, per call site.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Calls whose result needs values on the host: reads, formatting, comparisons to a Python bool, and ops whose
# output shape depends on the values (the host learns the size before it can allocate).
READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__format__,
         torch.Tensor.__repr__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
         torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.equal, torch.Tensor.equal,
         torch.allclose, torch.Tensor.allclose}
FROM_HOST = {torch.tensor, torch.as_tensor}
MASK_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}

_TORCH_DIR = os.path.dirname(torch.__file__)


def _by_mask(func: Any, args: tuple) -> bool:
    """`t[mask]` or `t[mask] = v` with a boolean mask: the selected count is read first."""
    if func not in MASK_INDEXING or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in index)


def _sized_by_values(func: Any, args: tuple, kwargs: dict) -> bool:
    """repeat_interleave with tensor repeats and no output_size: the output size is their sum, read on the host."""
    return (func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and kwargs.get("output_size") is None
            and any(isinstance(a, torch.Tensor) and a.numel() > 1 for a in (*args[1:2], kwargs.get("repeats"))))


def _to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """`t.to("cpu")` of a device tensor (on a CPU run, `.to(device)` is a no-op and not counted)."""
    if func is not torch.Tensor.to or not args or args[0].device.type == "cpu":
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(str(t) == "cpu" or getattr(t, "type", None) == "cpu" for t in targets if t is not None)


class SyncCounter(TorchFunctionMode):
    """Counts, by call site, the torch calls that would synchronise the host with a GPU.

    `ignore`: function names whose calls (anywhere up the stack) are not counted, e.g. a check that runs only
    for CPU tensors.
    """

    def __init__(self, ignore: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.ignore = set(ignore)
        self.sites: collections.Counter[str] = collections.Counter()
        self._accelerator: Any = None

    def __enter__(self) -> "SyncCounter":
        if "deepspeed.accelerator" in sys.modules:
            from deepspeed.accelerator import get_accelerator

            self._accelerator = get_accelerator()
            original = type(self._accelerator).synchronize

            def synchronize(*args: Any, **kwargs: Any) -> Any:
                self._count()
                return original(self._accelerator, *args, **kwargs)

            self._accelerator.synchronize = synchronize  # an instance attribute shadows the method until __exit__
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._accelerator is not None:
            del self._accelerator.synchronize
            self._accelerator = None
        super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func in READS or (func in FROM_HOST and kwargs.get("device") is not None) or _by_mask(func, args)
                or _sized_by_values(func, args, kwargs) or _to_host(func, args, kwargs)):
            self._count()
        return func(*args, **kwargs)

    def _count(self) -> None:
        site = self._site()
        if site is not None:
            self.sites[site] += 1

    def _site(self) -> str | None:
        frame, site = sys._getframe(3), None
        while frame is not None:
            code = frame.f_code
            if code.co_name in self.ignore:
                return None
            if site is None and not code.co_filename.startswith(_TORCH_DIR) and code.co_filename != __file__:
                path = code.co_filename.split("site-packages" + os.sep)[-1]
                site = f"{path}:{frame.f_lineno} ({code.co_name})"
            frame = frame.f_back
        return site or "?"


def count_engine_step(ds_config: str | dict, steps: int = 2) -> SyncCounter:
    """Host syncs in `steps` pretraining steps (after three warm-up steps) of the tiny preset through the engine."""
    from electra_ds.config import preset
    from electra_ds.model import ElectraForPretraining
    from electra_ds.train import engine as ds_engine
    from electra_ds.train.pretrain import pretraining_step

    ds_engine.setup_distributed()
    config = ds_engine.load_ds_config(ds_config, micro_batch_size=2, gradient_accumulation_steps=1, world_size=1)
    torch.manual_seed(0)
    model = ElectraForPretraining(preset("tiny", vocab_size=64))
    engine = ds_engine.initialize(model, config, learning_rate=1e-3, warmup_steps=1, max_steps=10)
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = ds_engine.device_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "token_type_ids": torch.zeros_like(ids)}, engine.device)
    kw = dict(special_ids={"pad": 0, "cls": 1, "sep": 2, "mask": 3}, mlm_probability=0.15, max_predictions=3, seed=0)
    try:
        for step in range(3):  # optimizer state and lazy set-up; DeepSpeed's timers start at the third step
            pretraining_step(engine, batch, step=step, **kw)
        with SyncCounter(ignore=("check_token_ids",)) as syncs:  # the model checks ids of CPU tensors only
            for step in range(3, 3 + steps):
                pretraining_step(engine, batch, step=step, **kw)
    finally:
        engine.destroy()
    return syncs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Count the host synchronisations in pretraining steps through the "
                                            "DeepSpeed engine (tiny preset), per call site.")
    p.add_argument("--deepspeed_config", default="auto", help="a path or a name in ds_configs/")
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    from electra_ds.train.engine import quiet_deepspeed, resolve_ds_config

    quiet_deepspeed()
    syncs = count_engine_step(args.deepspeed_config, args.steps)
    print(f"{resolve_ds_config(args.deepspeed_config)}: {syncs.total / args.steps:g} host syncs per step")
    for site, n in syncs.sites.most_common():
        print(f"  {n / args.steps:g}/step  {site}")
    return 0


__all__ = ["SyncCounter", "count_engine_step"]

if __name__ == "__main__":
    sys.exit(main())
