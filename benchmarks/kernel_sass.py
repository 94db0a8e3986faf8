"""Count the machine instructions of the generator head's forward kernel (the loss and sampling sweep over the
logits), compiled for the H100/H200 (sm_90) by Triton's compiler: no GPU needed.

The sweep reads 2 bytes per logit; its time on the card is bounded by those bytes and by the instructions it issues
per logit, which this prints (in the sweep's loop, and per thread outside it) for ELECTRA-Small's logits (bf16 rows of
30528 columns, aligned as the model makes them), at temperature 1 and not.
Usage: python benchmarks/kernel_sass.py [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from electra_ds.files import atomic_write
from electra_ds.kernels import xentropy

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


def measure(vocab: int = 30528, tempered: bool = False) -> dict:
    launch = xentropy.forward_launch(vocab, 0.5 if tempered else 1.0)
    options = {k: launch.pop(k) for k in ("num_warps", "enable_fp_fusion")}  # the rest are the constexprs
    names = list(SIGNATURE) + list(launch)
    signature = {**SIGNATURE, **{k: "constexpr" for k in launch}}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in ALIGNED}
    source = ASTSource(fn=xentropy._electra_xentropy_sample_fwd, signature=signature, constexprs=launch, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    in_loop, outside = loop_instructions(disassemble(compiled.asm["cubin"]))
    per_thread = launch["BLOCK"] // (32 * options["num_warps"])  # logits each thread handles per trip
    return {"vocab": vocab, "tempered": tempered, "block": launch["BLOCK"], "num_warps": options["num_warps"],
            "loop_instructions_per_logit": in_loop / per_thread, "instructions_outside_loop": outside}


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
    if args.json:
        atomic_write(args.json, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
