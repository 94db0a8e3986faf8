"""Count the machine instructions of the generator head's forward kernel (the loss and sampling sweep over the
logits), compiled for the H100/H200 (sm_90) by Triton's compiler: no GPU needed.

The sweep reads 2 bytes per logit; its time on the card is bounded by those bytes and by the instructions it issues
per logit, which this prints (in the sweep's loop, and per thread outside it) for ELECTRA-Small's logits (bf16 rows of
30528 columns, aligned as the model makes them), at temperature 1 and not. Then the same count per value for the
kernels that walk row tiles and sum columns (the LayerNorm and GELU backward, bf16, ELECTRA-Small's discriminator
widths, under their blockings in use): instructions x values / the card's issue rate is the time they need at least
besides their bytes.
Usage: python benchmarks/kernel_sass.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from electra_ds.files import atomic_write
from electra_ds.kernels import gelu, launch, layer_norm, xentropy

SIGNATURE = {"Logits": "*bf16", "Targets": "*i64", "Seed": "*i64", "Loss": "*fp32", "Lse": "*fp32", "Sample": "*i64",
             "Argmax": "*i64", "V": "i32", "S": "i32", "stride": "i32", "inv_t": "fp32"}
ALIGNED = ("Logits", "Targets", "Seed", "Loss", "Lse", "Sample", "Argmax", "V", "stride")  # 16-divisible at launch


def disassemble(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) pairs of a cubin, from the cuobjdump that Triton's wheel ships."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+(.*?)\s*;", text)]


def loop_instructions(code: list[tuple[int, str]]) -> tuple[int, int]:
    """(instructions one trip of the first loop runs when every forward branch in it is taken the short way, i.e.
    its main path; instructions outside it)."""
    branches = [(a, int(t.split()[-1], 16)) for a, t in code if re.search(r"\bBRA\s+0x[0-9a-f]+$", t)]
    start, end = next((target, a) for a, target in branches if target < a)
    skipped = sum((target - a) // 16 - 1 for a, target in branches if start <= a < end and target > a)
    in_loop = (end - start) // 16 + 1
    return in_loop - skipped, len(code) - in_loop


def compile_sm90(fn, signature: dict[str, str], constexprs: dict, aligned: Sequence[str],
                 options: dict) -> list[tuple[int, str]]:
    """`fn` compiled for sm_90 with these argument types, constexprs, 16-divisible arguments and launch options:
    its disassembly (`disassemble`)."""
    names = list(signature) + list(constexprs)
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in aligned}
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                       attrs=attrs)
    return disassemble(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"])


def measure(vocab: int = 30528, tempered: bool = False) -> dict:
    constexprs = xentropy.forward_launch(vocab, 0.5 if tempered else 1.0)
    options = {k: constexprs.pop(k) for k in ("num_warps", "enable_fp_fusion")}  # the rest are the constexprs
    in_loop, outside = loop_instructions(compile_sm90(xentropy._electra_xentropy_sample_fwd, SIGNATURE, constexprs,
                                                      ALIGNED, options))
    per_thread = constexprs["BLOCK"] // (32 * options["num_warps"])  # logits each thread handles per trip
    return {"vocab": vocab, "tempered": tempered, "block": constexprs["BLOCK"], "num_warps": options["num_warps"],
            "loop_instructions_per_logit": in_loop / per_thread, "instructions_outside_loop": outside}


def measure_backward_rows(hidden: int = 256, rows: int = 16384) -> list[dict]:
    """Instructions per value in the loop of the LayerNorm backward (dense bias, dropout, residual) at width `hidden`
    and of the bias + GELU backward at 4 x hidden, launched as `launch.layer_norm_backward_launch` and
    `launch.gelu_backward_launch` plan them for `rows` rows."""
    cpu = torch.device("cpu")  # the tile and warps do not depend on the device
    ln = launch.layer_norm_backward_launch(torch.Size((rows, hidden)), cpu)
    gelu_grid = launch.gelu_backward_launch(torch.Size((rows, 4 * hidden)), cpu)
    pointers = {k: "*bf16" for k in ("X", "XB", "R")} | {"W": "*fp32", "DY": "*bf16", "Mean": "*fp32",
                                                         "Rstd": "*fp32", "Seed": "*i64", "DX": "*bf16",
                                                         "DR": "*bf16", "Partials": "*fp32"}
    ln_signature = pointers | {"N": "i32", "H": "i32", "rows_per_program": "i32", "p": "fp32", "scale": "fp32"}
    gelu_signature = {k: "*bf16" for k in ("X", "B", "DY", "DX")} | {"DB": "*fp32", "N": "i32", "F": "i32",
                                                                     "rows_per_program": "i32"}
    cases = ((layer_norm._electra_add_layer_norm_bwd, ln, hidden, ln_signature,
              {"HAS_XBIAS": True, "HAS_RES": True, "DROPOUT": True, "BLOCK_M": ln.block_m, "BLOCK_H": ln.block_cols,
               "STAGES": ln.num_stages},
              [k for k in ln_signature if k not in ("Seed", "p", "scale")]),
             (gelu._electra_bias_gelu_bwd, gelu_grid, 4 * hidden, gelu_signature,
              {"BLOCK_M": gelu_grid.block_m, "BLOCK_F": gelu_grid.block_cols, "STAGES": gelu_grid.num_stages},
              list(gelu_signature)))
    out = []
    for fn, grid, columns, signature, constexprs, aligned in cases:
        code = compile_sm90(fn, signature, constexprs, aligned, {"num_warps": grid.num_warps})
        per_thread = grid.block_m * grid.block_cols // (32 * grid.num_warps)  # values each thread handles per trip
        out.append({"kernel": fn.__name__, "columns": columns, "num_warps": grid.num_warps,
                    "instructions_per_value": loop_instructions(code)[0] / per_thread})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    rows = [measure(tempered=t) for t in (False, True)]
    for r in rows:
        temperature = "!= 1" if r["tempered"] else "1"
        print(f"_electra_xentropy_sample_fwd, sm_90, {r['vocab']} columns, temperature {temperature}: "
              f"{r['loop_instructions_per_logit']:.1f} instructions per logit in the sweep, "
              f"{r['instructions_outside_loop']} outside it")
    backward = measure_backward_rows()
    for r in backward:
        print(f"{r['kernel']}, sm_90, {r['columns']} columns, {r['num_warps']} warps: "
              f"{r['instructions_per_value']:.1f} instructions per value in its loop")
    if args.json:
        atomic_write(args.json, json.dumps(rows + backward, indent=1) + "\n")


if __name__ == "__main__":
    main()
