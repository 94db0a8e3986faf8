"""Compile every Triton kernel launch of an ELECTRA pretraining step for a GPU architecture, on a machine without one.

The interpreter (TRITON_INTERPRET=1, tests/test_kernels.py) runs a kernel's Python semantics; only Triton's GPU
compiler sees what would fail on the card (types it cannot lower, layouts, what ptxas rejects). Triton builds a cubin
ahead of time without a device (with the ptxas its wheel ships), so this checks, in two processes:

    TRITON_INTERPRET=1 python tests/kernel_compile_check.py record LAUNCHES.json
        one training step of ELECTRA-Small's widths (one layer per tower, a batch of 2 x 128; fp32, then bf16 and fp16
        autocast, dropout on) and ElectraAdam's step, all through the Triton kernels under the interpreter, saving
        each distinct launch: kernel, argument types, which arguments are 16-aligned pointers or multiples of 16
        (Triton's launcher specialises on those on a GPU), constexprs and launch options;
    TRITON_INTERPRET=1 python tests/kernel_compile_check.py record --candidate_blockings LAUNCHES.json
        instead, the attention kernels and the LayerNorm and GELU backward kernels under each candidate blocking that
        benchmarks/kernel_speed.py times (--attention_configs, --row_configs);
    python tests/kernel_compile_check.py compile LAUNCHES.json [--arch 90]
        each saved launch compiled with Triton's compiler for sm_ARCH (90: the H100 and H200), without the
        interpreter; prints one line per launch (registers per thread, stack and local memory: spills) and exits 1
        naming any that fails.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a kernel argument of type {type(value).__name__}")


def _aligned(value) -> bool:
    """What Triton's launcher specialises on a GPU: a 16-byte aligned pointer, an integer divisible by 16."""
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return type(value) is int and value % 16 == 0


def launch_record(fn, args: tuple, kwargs: dict, unaligned: tuple = ()) -> dict:
    """A JSON-able description of one launch of the kernel function `fn` (the plain Python function); `unaligned`:
    the parameters (names or indices) that the kernel does not specialise on alignment."""
    params = list(inspect.signature(fn).parameters.values())
    values = dict(zip([p.name for p in params], args))
    values.update({k: v for k, v in kwargs.items() if k not in OPTIONS})
    signature, constexprs, aligned = {}, {}, []
    for i, p in enumerate(params):
        value = values[p.name]
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        else:
            signature[p.name] = _arg_type(value)
            if _aligned(value) and p.name not in unaligned and i not in unaligned:
                aligned.append(p.name)
    if constexprs.get("UPCAST"):  # fused_attention's fp32 dots stand in for bf16 ones under the interpreter only
        constexprs["UPCAST"] = False
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature, "constexprs": constexprs,
            "aligned": aligned, "options": {k: v for k, v in kwargs.items() if k in OPTIONS}}


def _training_steps() -> None:
    from electra_ds import kernels
    from electra_ds.config import preset
    from electra_ds.model import ElectraForPretraining
    from electra_ds.train.optim import ElectraAdam
    from model_helpers import make_batch, mask_plan  # this script's folder, tests/, is on sys.path

    kernels.set_backend("triton")
    vocab = preset("small").vocab_size
    for autocast in (None, torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = ElectraForPretraining(preset("small", num_hidden_layers=1)).train()
        ids, mask = make_batch(vocab, batch=2, length=128, pad_from={1: 100})  # ELECTRA's length: the attention tiles
        plan = mask_plan(ids, mask, vocab_size=vocab, max_predictions=3, seed=1)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            out = model(ids, None if autocast is None else mask, None, plan, torch.tensor(1))  # fp32: unmasked
        out.loss.backward()
        if autocast is None:
            ElectraAdam(model.param_groups(0.01), lr=1e-4, max_grad_norm=1.0).step()
    for dtype, scale in ((torch.bfloat16, torch.tensor(0.5)), (torch.float16, torch.tensor(0.5)),
                         (torch.float32, None)):  # DeepSpeed's half-precision weights; no clipping
        p = torch.zeros(100, dtype=dtype)
        kernels.adam_step(p, torch.ones_like(p), torch.zeros(100), torch.zeros(100), lr=1e-3, beta1=0.9,
                          beta2=0.999, eps=1e-6, weight_decay=0.01, grad_scale=scale)


def _candidate_blockings() -> None:
    from electra_ds import kernels
    from electra_ds.kernels import fused_attention

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks/
    from benchmarks.kernel_speed import attention_blocking, attention_configs, row_blocking, row_configs

    qkv = torch.randn(1, 128, 3 * 128, dtype=torch.bfloat16, requires_grad=True)  # ELECTRA's length, 64-wide heads
    for config in attention_configs().values():
        with attention_blocking(config):
            out = fused_attention.attention(qkv, 2, torch.ones(1, 128, dtype=torch.long), 0.1, torch.tensor(1))
            out.sum().backward()
    kernels.set_backend("triton")
    for op, config in row_configs().values():
        for hidden in (256, 64):  # ELECTRA-Small's discriminator and generator widths (the FFN's: 4x)
            x = torch.randn(64, hidden * (4 if op == "gelu" else 1), dtype=torch.bfloat16, requires_grad=True)
            bias = torch.zeros(x.shape[-1], dtype=torch.bfloat16, requires_grad=True)
            with row_blocking(op, config):
                out = kernels.bias_gelu(x, bias) if op == "gelu" else kernels.add_layer_norm(
                    x, torch.randn_like(x), torch.ones_like(bias), bias, 1e-12, 0.1, torch.tensor(1), bias)
                out.float().sum().backward()


def record(path: Path, candidate_blockings: bool = False) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("record runs the kernels under the interpreter: set TRITON_INTERPRET=1")
    from triton.runtime.interpreter import InterpretedFunction

    launches: dict[str, dict] = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        entry = launch_record(self.fn, args, kwargs, tuple(self.kwargs.get("do_not_specialize_on_alignment") or ()))
        launches.setdefault(json.dumps(entry, sort_keys=True), entry)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        _candidate_blockings() if candidate_blockings else _training_steps()
    finally:
        InterpretedFunction.run = run
    path.write_text(json.dumps(list(launches.values()), indent=1))
    print(f"{len(launches)} distinct kernel launches recorded in {path}")
    return 0


def resource_usage(compiled) -> dict[str, int | None]:
    """Registers per thread, stack and local memory (bytes: spills) of a compiled kernel's cubin, from the cuobjdump
    Triton's wheel ships (None without it), and the shared memory its launch asks for (Triton's metadata: reductions'
    scratch and the software pipeline's buffers; cuobjdump sees only the static 1 KiB)."""
    import triton

    usage = {"registers": None, "stack": None, "local": None, "shared": compiled.metadata.shared}
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if tool.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            dump = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", dump))
        usage.update({k: int(fields[f]) if f in fields else None
                      for k, f in (("registers", "REG"), ("stack", "STACK"), ("local", "LOCAL"))})
    return usage


def _resources(compiled) -> str:
    u = resource_usage(compiled)
    if u["registers"] is None:
        return f"{len(compiled.asm['cubin'])} B cubin, {u['shared']} B shared"
    return f"{u['registers']} registers, {u['stack']} B stack + {u['local']} B local (spills), {u['shared']} B shared"


def compile_all(path: Path, arch: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile needs Triton's compiler, not the interpreter: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failed = []
    for entry in json.loads(path.read_text()):
        kernel = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        label = f"{entry['kernel']} {entry['constexprs']} {entry['options']}"
        start = time.perf_counter()
        try:
            names = list(entry["signature"])
            attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in entry.get("aligned", [])}
            source = ASTSource(fn=kernel, signature=entry["signature"], constexprs=entry["constexprs"], attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=entry["options"])
            print(f"ok   {label}: {_resources(compiled)}, {time.perf_counter() - start:.1f} s")
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status says it
            failed.append(label)
            print(f"FAIL {label}: {type(e).__name__}: {e}")
    print(f"{len(failed)} of the launches failed to compile for sm_{arch}" if failed else
          f"every launch compiled for sm_{arch}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("record", "compile"))
    parser.add_argument("launches", type=Path, help="the JSON of recorded launches")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--candidate_blockings", action="store_true",
                        help="record: instead of a training step, the attention kernels (bf16, padding mask, dropout) "
                             "and the LayerNorm and GELU backward kernels (bf16) under each candidate blocking of "
                             "benchmarks/kernel_speed.py --attention_configs and --row_configs")
    args = parser.parse_args(argv)
    if args.mode == "record":
        return record(args.launches, args.candidate_blockings)
    return compile_all(args.launches, args.arch)


if __name__ == "__main__":
    sys.exit(main())
