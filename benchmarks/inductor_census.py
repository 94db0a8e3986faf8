"""What torch.compile generates for one ELECTRA pretraining step on an sm_90 GPU (H100/H200), counted on a machine
without one: the kernel launches of each compiled graph (the masking, the training forward, its backward).

On a GPU the step is bound by its many small kernels (README, "Measured speed"): each launch costs a few
microseconds however little it does, so the launch count is the figure to watch between GPU runs. Here inductor
generates its GPU code (Triton kernels and the wrapper that launches them) for CPU tensors: its Triton backend
serves the CPU, the compiler target is sm_90, the device reports an H200's 132 multiprocessors, and inductor's
CPU-only heuristics (realizing reused values, loop reordering, concatenation by copies, small matrix products as
pointwise code, no combo kernels) are turned off; with triton.enable_pdl=True the kernels wait for their predecessor
(`gdc_wait`, counted) as for an sm_90 device. Nothing runs: the generated kernels are not compiled (their
launches do nothing), and our opaque ops (attention, the generator head) return empty tensors of their shapes. So
the census counts launches and names kernels, and adds up inductor's estimate of the bytes each kernel reads and
writes (its buffers' sizes: the memory traffic, which at the card's bandwidth bounds the kernels' time from below;
our ops and the matrix products are not counted); it says nothing else of their speed. Matrix-product choices
(cuBLAS) and mix-order reductions are not modelled. With --build it then compiles each generated kernel for sm_90
under every config its autotuner would try on the card (Triton's compiler needs no GPU): what would fail to build,
registers, spills. With --profile it reads a throughput.py result profiled on a GPU (from the same code and torch
version, so that the kernels have the same names) and prints each profiled variant's kernels with the bandwidth
they reached (throughput.py records that itself since it compiles with benchmark_kernel when profiling on a GPU).

    python benchmarks/inductor_census.py [--model_size small] [--batch_size 128] [--build] [--json PATH]
                                         [--sources DIR] [--profile RESULT_JSON]

It patches inductor internals, so it follows torch's versions (written against torch 2.11, the H200 image's,
and 2.13). For the H200's exact inductor, run it under torch 2.11 (a virtual environment with torch==2.11.0 and
its CUDA libraries, which import without a GPU).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"  # a cached graph would skip the code generation

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import step_profile  # noqa: E402
from benchmarks.step_profile import kernel_gigabytes, merged_kernel_gigabytes  # noqa: E402

H200_PROPERTIES = {"multi_processor_count": 132, "cc": 90, "major": 9, "regs_per_multiprocessor": 65536,
                   "max_threads_per_multi_processor": 2048, "max_threads_per_block": 1024, "warp_size": 32}


def _redefine(fn: Any, old: str, new: str, namespace: dict[str, Any]) -> Any:
    """`fn` compiled again from its source with `old` replaced by `new`, in `namespace` (its module's globals)."""
    source = textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))
    if old not in source:
        raise RuntimeError(f"torch {torch.__version__}: inductor's {fn.__qualname__} changed; update this census")
    defined: dict[str, Any] = {}
    exec(source.replace("@staticmethod\n", "").replace(old, new), namespace, defined)
    return defined[fn.__name__]


GENERATED: dict[str, str] = {}  # the source of each Triton kernel generated -> its name (names repeat across graphs)


def generate_gpu_code_for_cpu() -> None:
    """Make inductor generate (not compile) its sm_90 Triton code for CPU tensors, process-wide."""
    import torch._functorch.config as functorch_config
    import torch._inductor.codegen.cpu_device_op_overrides as cpu_device_op_overrides
    import torch._inductor.async_compile as async_compile
    import torch._inductor.codegen.triton as triton_codegen
    import torch._inductor.config as inductor_config
    import torch._inductor.decomposition as decomposition
    import torch._inductor.ir as ir
    import torch._inductor.lowering as lowering
    import torch._inductor.runtime.hints as hints
    import torch._inductor.scheduler as scheduler
    import torch.utils._triton as torch_triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    inductor_config.cpu_backend = "triton"
    inductor_config.benchmark_kernel = True  # each kernel's metadata then estimates the bytes it moves
    # The benchmark harness that benchmark_kernel adds to each kernel's module (which --build loads) takes its stream
    # and device guard from the CPU's code here: a stream getter in one line, as for CUDA (the harness dedents it with
    # its other imports), and a guard that is an expression (torch 2.11's "pass" made `with pass:`).
    cpu_ops = cpu_device_op_overrides.CpuDeviceOpOverrides
    cpu_ops.import_get_raw_stream_as = lambda _self, name: f"{name} = lambda _device: 0"
    cpu_ops.device_guard = lambda _self, _index: "torch._ops.contextlib.nullcontext()"
    functorch_config.force_non_lazy_backward_lowering = True  # the backward's code at the forward's compile
    backend = make_backend(GPUTarget("cuda", 90, 32))
    torch_triton.triton_backend = lambda: backend
    create = hints.DeviceProperties.create.__func__
    hints.DeviceProperties.create = classmethod(lambda cls, device: create(cls, device)._replace(**H200_PROPERTIES))
    for op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
        decomposition.decompositions.pop(op, None)  # CPU-only: small products rewritten as pointwise code
    ir.is_cpu = lambda _node: False
    scheduler.BaseSchedulerNode.is_cpu = lambda _self: False
    # re-registering aten.cat's lowering: a CPU cat copies each input in a kernel of its own
    _redefine(lowering.cat, 'cpu_device = inputs[0].get_device().type == "cpu"', "cpu_device = False",
              lowering.__dict__)
    kernel = triton_codegen.TritonKernel  # programmatic dependent launch (triton.enable_pdl=True) on an sm_90 device
    kernel._enable_pdl_codegen = staticmethod(_redefine(
        kernel._enable_pdl_codegen, 'V.graph.get_current_device_or_throw().type == "cuda"',
        'True or V.graph.get_current_device_or_throw().type == "cuda"', triton_codegen.__dict__))
    foreach = scheduler.ForeachKernelSchedulerNode  # combo kernels (--inductor combo_kernels=True) skip CPU nodes
    foreach.set_group_algorithm_for_combo_kernels(_redefine(
        foreach._default_group_nodes_for_combo_kernels, 'device.type == "mps" or device.type == "cpu"',
        'device.type == "mps"', scheduler.__dict__))

    class Launch:  # a generated kernel that is never compiled: its launches do nothing
        def run(self, *args, **kwargs) -> None:
            return None

    def generated(self, kernel_name: str, source_code: str, device_str: str = "cuda") -> Launch:
        GENERATED[source_code] = kernel_name
        return Launch()

    async_compile.AsyncCompile.triton = generated


def stand_in_opaque_ops() -> None:
    """Our ops that stay opaque under torch.compile (as on CUDA: backend "triton") run their fake implementations
    on the CPU: empty tensors of their outputs' shapes."""
    from electra_ds import kernels

    for op, outputs in ((kernels._attention_op, kernels._attention_outputs),
                        (kernels._attention_backward_op, kernels._attention_backward_outputs),
                        (kernels._layer_norm_op, kernels._layer_norm_outputs),
                        (kernels._layer_norm_backward_op, kernels._layer_norm_backward_outputs),
                        (kernels._gelu_op, kernels._gelu_output),
                        (kernels._gelu_backward_op, kernels._gelu_backward_outputs),
                        (kernels._cross_entropy_and_sample_op, kernels._cross_entropy_and_sample_outputs)):
        op.register_kernel("cpu")(outputs)
    kernels.set_backend("triton")


def launches(source: str) -> list[dict[str, Any]]:
    """The launches of a generated module's `call`, in order: Triton kernels (name, and the product of the sizes
    that the launch passes: the elements a pointwise kernel computes, those a reduction reads), extern kernels
    (matrix products) and custom or aten ops."""
    call = source[source.rfind("def call("):]
    out = []
    for line in call.splitlines():
        line = line.strip()
        if match := re.match(r"((triton_\w+?)(?:_\d+)?)\.run\((.*)\)$", line):
            sizes = re.search(r"((?:, \d+)+)(?:, (?:stream|grid)\b.*)?$", match.group(3))
            elements = math.prod(int(n) for n in sizes.group(1).split(", ")[1:]) if sizes else None
            out.append({"kind": "triton", "kernel": match.group(1), "name": match.group(2), "elements": elements})
        elif match := re.search(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+|\baten\.\w+)(?:\.\w+)?\(", line):
            out.append({"kind": "extern" if match.group(1).startswith("extern") else "op", "name": match.group(1)})
    return out


def graph_summary(source: str) -> dict[str, Any]:
    calls = launches(source)
    triton = [c for c in calls if c["kind"] == "triton"]
    gigabytes = kernel_gigabytes(source)
    moved: collections.Counter[str] = collections.Counter()  # kernel -> GB in all its launches
    for c in triton:
        moved[c["kernel"]] += gigabytes.get(c["kernel"], 0.0)
    launched = collections.Counter(c["kernel"] for c in triton)
    return {"triton_kernels": len(triton),
            "gigabytes": sum(moved.values()),
            "kernels_without_gigabytes": sum(c["kernel"] not in gigabytes for c in triton),  # combo kernels, torch 2.11
            "gigabytes_by_kernel": [(name, launched[name], round(gb, 9)) for name, gb in moved.most_common()],
            "atomic_adds": source.count("tl.atomic_add("),  # statements in the graph's kernels (scatter-adds)
            "pdl_waits": source.count("gdc_wait()"),  # triton.enable_pdl=True: in-kernel waits for the kernel before
            "one_value_kernels": collections.Counter(c["name"] for c in triton
                                                     if c["elements"] == 1 and c["name"].startswith("triton_poi")),
            "extern_kernels": collections.Counter(c["name"] for c in calls if c["kind"] == "extern"),
            "ops": collections.Counter(c["name"] for c in calls if c["kind"] == "op"),
            "by_name": collections.Counter(c["name"] for c in triton).most_common()}


def census(model_size: str, batch_size: int, max_length: int, inductor: dict[str, Any] | None = None
           ) -> list[str]:
    """Compile one pretraining step (the training path of `pretrain.py --compile`: the DeepSpeed engine with the
    bf16 config) as for an sm_90 GPU; the code generated for each compiled graph, in compile order."""
    from torch._inductor.utils import run_and_get_code

    from benchmarks.hf_baseline import random_batch, special_token_ids
    from electra_ds.config import RECIPES, max_predictions, preset
    from electra_ds.model.electra import ElectraForPretraining
    from electra_ds.train import engine as ds_engine
    from electra_ds.train.pretrain import compile_engine, forward

    generate_gpu_code_for_cpu()
    stand_in_opaque_ops()
    config = preset(model_size)
    specials = special_token_ids(config.vocab_size)
    ds_engine.setup_distributed()
    ds_config = ds_engine.load_ds_config("bf16", micro_batch_size=batch_size, gradient_accumulation_steps=1,
                                         world_size=1)
    engine = ds_engine.initialize(ElectraForPretraining(config).train(), ds_config, learning_rate=1e-4,
                                  warmup_steps=10, max_steps=100, weight_decay=0.01, optimizer="electra_adam")
    mask_fn = compile_engine(engine, None, inductor)
    ids, mask = random_batch(config.vocab_size, batch_size, max_length, specials, torch.Generator().manual_seed(0))
    batch = ds_engine.device_batch({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                                   engine.device)
    mlm = RECIPES[model_size]["mlm_probability"]
    _, sources = run_and_get_code(forward, engine, batch, special_ids=specials, mlm_probability=mlm,
                                  max_predictions=max_predictions(max_length, mlm), step=0, seed=0, rank=0,
                                  mask_fn=mask_fn)
    engine.destroy()
    return sources


def build(sources: dict[str, str], arch: int = 90) -> list[dict[str, Any]]:
    """Each generated kernel (source -> name, `GENERATED`) compiled by Triton for sm_`arch` under every config its
    autotuner would try on the GPU (nothing runs): per config its registers, spills and shared memory
    (tests/kernel_compile_check.py's `resource_usage`), or the compiler's error."""
    import triton
    from torch._inductor.codecache import PyCodeCache
    from tqdm import tqdm
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.kernel_compile_check import resource_usage

    built = []
    for i, (source, name) in enumerate(tqdm(sources.items(), desc=f"building for sm_{arch}", unit="kernel",
                                            file=sys.stderr)):
        tuner = getattr(PyCodeCache.load(source), name)
        for config in tuner.configs:
            meta = tuner._create_compile_meta(config)
            entry = {"source": i, "kernel": name, "config": str(config)}
            try:
                compiled = triton.compile(ASTSource(tuner.fn, meta["signature"], meta["constants"], meta["configs"][0]),
                                          target=GPUTarget("cuda", arch, 32),
                                          options=tuner._create_compile_options(config, meta))
                entry.update(resource_usage(compiled))
            except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status says it
                entry["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            built.append(entry)
    return built


def spills(entry: dict[str, Any]) -> bool:
    return bool(entry.get("local") or entry.get("stack"))


def build_summary(built: list[dict[str, Any]], arch: int) -> str:
    """Failures, and the kernels whose every config spills (the autotuner picks among a kernel's configs on the
    card, so a spilling config matters only where it has no alternative)."""
    failed = [b for b in built if "error" in b]
    by_source = collections.defaultdict(list)
    for b in built:
        by_source[b["source"]].append(b)
    always = [configs[0]["kernel"] for configs in by_source.values() if all(spills(b) for b in configs)]
    lines = [f"built for sm_{arch}: {len(by_source)} kernels under {len(built)} configs, {len(failed)} failed; "
             f"{sum(map(spills, built))} configs spill, in {len(always)} kernels all of them"]
    ok = [b for b in built if "error" not in b and b["registers"] is not None]
    if ok:
        top = max(ok, key=lambda b: b["registers"])
        lines.append(f"most registers: {top['registers']} per thread ({top['kernel']}, {top['config']}); most shared "
                     f"memory: {max(b['shared'] for b in ok)} B")
    lines += [f"    FAILED {b['kernel']} ({b['config']}): {b['error']}" for b in failed]
    lines += [f"    every config spills: {name}" for name in always]
    return "\n".join(lines)


def profile_bandwidth(result: dict[str, Any], gigabytes: dict[str, float]) -> str:
    """Each profiled variant of a throughput.py result whose kernels `gigabytes` (name -> GB per launch) knows, as
    step_profile.markdown writes it, with the bandwidth of those kernels."""
    sections = []
    for run in result["runs"]:
        for variant in run["variants"]:
            profile = variant.get("profile")
            if profile and profile.get("gpu_busy_ms_per_step") is not None:
                step_profile.add_bandwidth(profile, gigabytes)
                if profile["kernel_bandwidth"]:
                    sections.append(step_profile.markdown(f"{variant['name']} (batch {run['batch_size']})",
                                                          variant["ms_per_step"], profile))
    return "\n\n".join(sections) or "no profiled GPU variant ran a kernel of this census"


GRAPHS = ("masking", "forward", "backward")


def graph_names(graphs: list[dict[str, Any]]) -> list[str]:
    return list(GRAPHS) if len(graphs) == len(GRAPHS) else [f"graph {i}" for i in range(len(graphs))]


HBM_BYTES_PER_S = 4.8e12  # the H200's memory bandwidth (NVIDIA's figure)


def markdown(graphs: list[dict[str, Any]], top: int) -> str:
    lines = ["| graph | Triton kernels | of them pointwise over one value | GB they move (kernels not estimated) | "
             "ms at 4.8 TB/s | matrix products | other ops (ours, aten) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, g in zip(graph_names(graphs), graphs):
        lines.append(f"| {name} | {g['triton_kernels']} | {sum(g['one_value_kernels'].values())} | "
                     f"{g['gigabytes']:.3f} ({g['kernels_without_gigabytes']}) | "
                     f"{g['gigabytes'] * 1e12 / HBM_BYTES_PER_S:.3f} | "
                     f"{sum(g['extern_kernels'].values())} | {sum(g['ops'].values())} |")
    total = [sum(g["triton_kernels"] for g in graphs), sum(sum(g["one_value_kernels"].values()) for g in graphs)]
    gigabytes = sum(g["gigabytes"] for g in graphs)
    unestimated = sum(g["kernels_without_gigabytes"] for g in graphs)
    lines.append(f"| all | {total[0]} | {total[1]} | {gigabytes:.3f} ({unestimated}) | "
                 f"{gigabytes * 1e12 / HBM_BYTES_PER_S:.3f} | "
                 f"{sum(sum(g['extern_kernels'].values()) for g in graphs)} | "
                 f"{sum(sum(g['ops'].values()) for g in graphs)} |")
    for name, g in zip(graph_names(graphs), graphs):
        lines += ["", f"{name}: the most launched Triton kernels (launches, name without its index)"]
        lines += [f"    {n:4d} {kernel}" for kernel, n in g["by_name"][:top]]
        lines += ["", f"{name}: the Triton kernels that move the most (GB in all their launches, inductor's estimate; "
                      "launches; name)"]
        lines += [f"    {gb:7.3f} {n:4d} {kernel}" for kernel, n, gb in g["gigabytes_by_kernel"][:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from electra_ds import kernels
    from electra_ds.config import PRESETS
    from electra_ds.train.pretrain import compile_options, inductor_setting

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting (repeatable), as pretrain.py's --inductor (over "
                             "its COMPILE_DEFAULTS: combo_kernels=False counts the kernels before combining)")
    parser.add_argument("--compiled_layer_norm", choices=kernels.COMPILED_FORMS, default="traced",
                        help="kernels.set_compiled_layer_norm: the residual LayerNorms traced into inductor's kernels "
                             "or kept as our opaque op")
    parser.add_argument("--compiled_gelu", choices=kernels.COMPILED_FORMS, default="traced",
                        help="kernels.set_compiled_gelu: the bias + GELUs traced into inductor's kernels or kept as "
                             "our opaque op")
    parser.add_argument("--top", type=int, default=12, help="kernel names listed per graph")
    parser.add_argument("--build", action="store_true",
                        help="also compile every generated kernel for sm_90 under each of its autotuning configs "
                             "(Triton's compiler, no GPU; minutes): failures, registers, spills; exit status 1 if one "
                             "fails")
    parser.add_argument("--json", type=Path, help="write the census here")
    parser.add_argument("--profile", type=Path, metavar="RESULT_JSON",
                        help="a throughput.py result profiled on the GPU (--profile_steps) from the code and torch "
                             "version of this census: print its compiled variants' profiles with the bandwidth each "
                             "kernel reached, from the census's bytes estimates matched by kernel name")
    parser.add_argument("--sources", type=Path, metavar="DIR",
                        help="write each graph's generated code (its kernels and the wrapper launching them) here")
    args = parser.parse_args(argv)
    if args.build and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("--build needs Triton's compiler, not its interpreter: unset TRITON_INTERPRET")
    kernels.set_compiled_layer_norm(args.compiled_layer_norm)
    kernels.set_compiled_gelu(args.compiled_gelu)
    sources = census(args.model_size, args.batch_size, args.max_length, dict(args.inductor))
    graphs = [graph_summary(s) for s in sources]
    if args.sources:
        args.sources.mkdir(parents=True, exist_ok=True)
        for name, source in zip(graph_names(graphs), sources):
            (args.sources / f"{name.replace(' ', '_')}.py").write_text(source)
    print(f"torch {torch.__version__}, ELECTRA-{args.model_size}, batch {args.batch_size} x {args.max_length}, "
          f"bf16, {args.compiled_layer_norm} LayerNorms, {args.compiled_gelu} GELUs, as inductor generates it for sm_90"
          f" with {compile_options(None, dict(args.inductor))}")
    print(markdown(graphs, args.top))
    if args.profile:
        print(profile_bandwidth(json.loads(args.profile.read_text()), merged_kernel_gigabytes(sources)))
    built = build(GENERATED) if args.build else None
    if built is not None:
        print(build_summary(built, 90))
    if args.json:
        from electra_ds.files import atomic_write

        record = {"torch": torch.__version__, "model_size": args.model_size, "batch_size": args.batch_size,
                  "max_length": args.max_length, "inductor": dict(args.inductor),
                  "compile_options": compile_options(None, dict(args.inductor)),
                  "compiled_layer_norm": args.compiled_layer_norm, "compiled_gelu": args.compiled_gelu,
                  "graphs": dict(zip(graph_names(graphs), graphs)), "build": built}
        atomic_write(args.json, json.dumps(record, indent=1))
    if built and any("error" in b for b in built):
        sys.exit(1)
    return graphs


if __name__ == "__main__":
    main()
