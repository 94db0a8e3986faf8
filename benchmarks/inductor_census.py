"""What torch.compile generates for one ELECTRA pretraining step on an sm_90 GPU (H100/H200), counted on a machine
without one: the kernel launches of each compiled graph (the masking, the training forward, its backward).

On a GPU the step is bound by its many small kernels (README, "Measured speed"): each launch costs a few
microseconds however little it does, so the launch count is the figure to watch between GPU runs. Here inductor
generates its GPU code (Triton kernels and the wrapper that launches them) for CPU tensors: its Triton backend
serves the CPU, the compiler target is sm_90, the device reports an H200's 132 multiprocessors, and inductor's
CPU-only heuristics (realizing reused values, loop reordering, concatenation by copies, small matrix products as
pointwise code, no combo kernels) are turned off. Nothing runs: the generated kernels are not compiled (their
launches do nothing), and our opaque ops (attention, the generator head) return empty tensors of their shapes. So
the census counts launches and names kernels; it says nothing of their speed. Matrix-product choices (cuBLAS) and
mix-order reductions are not modelled.

    python benchmarks/inductor_census.py [--model_size small] [--batch_size 128] [--json PATH]

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


def generate_gpu_code_for_cpu() -> None:
    """Make inductor generate (not compile) its sm_90 Triton code for CPU tensors, process-wide."""
    import torch._functorch.config as functorch_config
    import torch._inductor.async_compile as async_compile
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
    foreach = scheduler.ForeachKernelSchedulerNode  # combo kernels (--inductor combo_kernels=True) skip CPU nodes
    foreach.set_group_algorithm_for_combo_kernels(_redefine(
        foreach._default_group_nodes_for_combo_kernels, 'device.type == "mps" or device.type == "cpu"',
        'device.type == "mps"', scheduler.__dict__))

    class Launch:  # a generated kernel that is never compiled: its launches do nothing
        def run(self, *args, **kwargs) -> None:
            return None

    async_compile.AsyncCompile.triton = lambda self, *args, **kwargs: Launch()


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
        if match := re.match(r"(triton_\w+?)(?:_\d+)?\.run\((.*)\)$", line):
            sizes = re.search(r"((?:, \d+)+)(?:, (?:stream|grid)\b.*)?$", match.group(2))
            elements = math.prod(int(n) for n in sizes.group(1).split(", ")[1:]) if sizes else None
            out.append({"kind": "triton", "name": match.group(1), "elements": elements})
        elif match := re.search(r"(extern_kernels\.\w+|torch\.ops\.\w+\.\w+|\baten\.\w+)(?:\.\w+)?\(", line):
            out.append({"kind": "extern" if match.group(1).startswith("extern") else "op", "name": match.group(1)})
    return out


def graph_summary(source: str) -> dict[str, Any]:
    calls = launches(source)
    triton = [c for c in calls if c["kind"] == "triton"]
    return {"triton_kernels": len(triton),
            "atomic_adds": source.count("tl.atomic_add("),  # statements in the graph's kernels (scatter-adds)
            "one_value_kernels": collections.Counter(c["name"] for c in triton
                                                     if c["elements"] == 1 and c["name"].startswith("triton_poi")),
            "extern_kernels": collections.Counter(c["name"] for c in calls if c["kind"] == "extern"),
            "ops": collections.Counter(c["name"] for c in calls if c["kind"] == "op"),
            "by_name": collections.Counter(c["name"] for c in triton).most_common()}


def census(model_size: str, batch_size: int, max_length: int, inductor: dict[str, Any] | None = None
           ) -> list[dict[str, Any]]:
    """Compile one pretraining step (the training path of `pretrain.py --compile`: the DeepSpeed engine with the
    bf16 config) as for an sm_90 GPU; a summary per compiled graph, in compile order."""
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
    return [graph_summary(s) for s in sources]


GRAPHS = ("masking", "forward", "backward")


def graph_names(graphs: list[dict[str, Any]]) -> list[str]:
    return list(GRAPHS) if len(graphs) == len(GRAPHS) else [f"graph {i}" for i in range(len(graphs))]


def markdown(graphs: list[dict[str, Any]], top: int) -> str:
    lines = ["| graph | Triton kernels | of them pointwise over one value | matrix products | other ops (ours, aten) |",
             "|---|---:|---:|---:|---:|"]
    for name, g in zip(graph_names(graphs), graphs):
        lines.append(f"| {name} | {g['triton_kernels']} | {sum(g['one_value_kernels'].values())} | "
                     f"{sum(g['extern_kernels'].values())} | {sum(g['ops'].values())} |")
    total = [sum(g["triton_kernels"] for g in graphs), sum(sum(g["one_value_kernels"].values()) for g in graphs)]
    lines.append(f"| all | {total[0]} | {total[1]} | {sum(sum(g['extern_kernels'].values()) for g in graphs)} | "
                 f"{sum(sum(g['ops'].values()) for g in graphs)} |")
    for name, g in zip(graph_names(graphs), graphs):
        lines += ["", f"{name}: the most launched Triton kernels (launches, name without its index)"]
        lines += [f"    {n:4d} {kernel}" for kernel, n in g["by_name"][:top]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from electra_ds import kernels
    from electra_ds.config import PRESETS
    from electra_ds.train.pretrain import inductor_setting

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--inductor", type=inductor_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a torch._inductor.config setting (repeatable), as pretrain.py's --inductor")
    parser.add_argument("--compiled_layer_norm", choices=kernels.COMPILED_FORMS, default="traced",
                        help="kernels.set_compiled_layer_norm: the residual LayerNorms traced into inductor's kernels "
                             "or kept as our opaque op")
    parser.add_argument("--compiled_gelu", choices=kernels.COMPILED_FORMS, default="traced",
                        help="kernels.set_compiled_gelu: the bias + GELUs traced into inductor's kernels or kept as "
                             "our opaque op")
    parser.add_argument("--top", type=int, default=12, help="kernel names listed per graph")
    parser.add_argument("--json", type=Path, help="write the census here")
    args = parser.parse_args(argv)
    kernels.set_compiled_layer_norm(args.compiled_layer_norm)
    kernels.set_compiled_gelu(args.compiled_gelu)
    graphs = census(args.model_size, args.batch_size, args.max_length, dict(args.inductor))
    print(f"torch {torch.__version__}, ELECTRA-{args.model_size}, batch {args.batch_size} x {args.max_length}, "
          f"bf16, {args.compiled_layer_norm} LayerNorms, {args.compiled_gelu} GELUs, as inductor generates it for sm_90"
          + (f", {dict(args.inductor)}" if args.inductor else ""))
    print(markdown(graphs, args.top))
    if args.json:
        from electra_ds.files import atomic_write

        record = {"torch": torch.__version__, "model_size": args.model_size, "batch_size": args.batch_size,
                  "max_length": args.max_length, "inductor": dict(args.inductor),
                  "compiled_layer_norm": args.compiled_layer_norm, "compiled_gelu": args.compiled_gelu,
                  "graphs": dict(zip(graph_names(graphs), graphs))}
        atomic_write(args.json, json.dumps(record, indent=1))
    return graphs


if __name__ == "__main__":
    main()
