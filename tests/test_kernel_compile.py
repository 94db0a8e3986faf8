"""Every Triton kernel launch of a pretraining step compiles for the H100/H200 (sm_90) here, without a GPU
(tests/kernel_compile_check.py: recorded under the interpreter, then built to cubins by Triton's compiler)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

CHECK = Path(__file__).with_name("kernel_compile_check.py")


def _nvidia_compiler() -> bool:
    """Triton's NVIDIA backend and the ptxas its wheel ships (or one named by TRITON_PTXAS_PATH)."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return "nvidia" in backends and (ptxas.exists() or bool(os.environ.get("TRITON_PTXAS_PATH")))


@pytest.mark.skipif(not _nvidia_compiler(), reason="this triton has no NVIDIA backend or ptxas to compile with")
def test_every_kernel_launch_compiles_for_hopper(tmp_path):
    launches = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compile for real, not from an earlier run's cache
    subprocess.run([sys.executable, str(CHECK), "record", str(launches)], env={**env, "TRITON_INTERPRET": "1"},
                   check=True, capture_output=True, text=True)
    recorded = json.loads(launches.read_text())
    kernels = {e["kernel"] for e in recorded}
    assert kernels == {"_electra_add_layer_norm_fwd", "_electra_add_layer_norm_bwd", "_electra_bias_gelu_fwd",
                       "_electra_bias_gelu_bwd", "_electra_xentropy_sample_fwd", "_electra_xentropy_bwd",
                       "_electra_sigmoid_bce_fwd", "_electra_sigmoid_bce_bwd", "_electra_dropout", "_electra_adam_step",
                       "_electra_attention_fwd", "_electra_attention_bwd"}
    assert any(e["constexprs"].get("DROPOUT") for e in recorded)  # training: the fused dropout is among them
    assert {e["constexprs"]["HAS_MASK"] for e in recorded if e["kernel"] == "_electra_attention_fwd"} == {False, True}
    # pointers specialised on 16-byte alignment, but not a dropout seed's (noise.UNALIGNED_SEED): a tower's site seeds
    # are one vector, so a seed at an 8-byte offset would have made a second build of each dropout kernel
    dropout_kernels = {"_electra_add_layer_norm_fwd", "_electra_add_layer_norm_bwd", "_electra_dropout",
                       "_electra_attention_fwd", "_electra_attention_bwd"}
    assert any(e["aligned"] for e in recorded)
    assert not any("Seed" in e["aligned"] for e in recorded if e["kernel"] in dropout_kernels)
    done = subprocess.run([sys.executable, str(CHECK), "compile", str(launches), "--arch", "90"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("\nok ") + done.stdout.startswith("ok ") == len(recorded)


@pytest.mark.skipif(not _nvidia_compiler(), reason="this triton has no NVIDIA backend or ptxas to compile with")
def test_candidate_blockings_compile_for_hopper_without_spills(tmp_path):
    """Every blocking of the attention kernels and of the LayerNorm and GELU backward kernels that
    `benchmarks/kernel_speed.py --attention_configs` and `--row_configs` time builds for sm_90 with nothing spilled
    to the stack or local memory."""
    launches = tmp_path / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    subprocess.run([sys.executable, str(CHECK), "record", "--candidate_blockings", str(launches)],
                   env={**env, "TRITON_INTERPRET": "1"}, check=True, capture_output=True, text=True)
    recorded = json.loads(launches.read_text())
    attention = [e for e in recorded if "attention" in e["kernel"]]
    assert len({(e["constexprs"]["BLOCK"], json.dumps(e["options"])) for e in attention}) > 3
    for name in ("_electra_add_layer_norm_bwd", "_electra_bias_gelu_bwd"):
        rows = [e for e in recorded if e["kernel"] == name]
        assert len({(e["constexprs"]["BLOCK_M"], json.dumps(e["options"])) for e in rows}) > 3, name
    done = subprocess.run([sys.executable, str(CHECK), "compile", str(launches), "--arch", "90"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    built = [line for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert len(built) == len(recorded) and all(" 0 B stack + 0 B local " in line for line in built), done.stdout
    # the pipelined walks (launch.Blocking.stages) are built as such: the next tiles' buffers in shared memory
    shared = {int(re.search(r"'STAGES': (\d)", line).group(1)): int(re.search(r"(\d+) B shared", line).group(1))
              for line in built if "_electra_add_layer_norm_bwd" in line and "'BLOCK_M': 8," in line
              and "{'num_warps': 8}" in line}
    assert shared[1] < shared[2] < shared[3], shared


@pytest.mark.skipif(not _nvidia_compiler(), reason="this triton has no NVIDIA backend or ptxas to compile with")
def test_kernel_sass_counts_the_generator_head_sweep(tmp_path):
    """benchmarks/kernel_sass.py compiles the head's forward for sm_90 and counts its loop: a few dozen instructions
    per logit (no per-column noise in the sweep), more with a temperature (a second log-sum-exp per chunk); then the
    LayerNorm and GELU backward kernels' loops, a few dozen instructions per value (the GELU's erf and exp among
    them). A subprocess without TRITON_INTERPRET, which the kernel tests set in this one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).parents[1] / "benchmarks" / "kernel_sass.py"
    subprocess.run([sys.executable, str(script), "--json", str(tmp_path / "sass.json")], env=env, check=True,
                   capture_output=True, text=True)
    plain, tempered, layer_norm, gelu = json.loads((tmp_path / "sass.json").read_text())
    assert 5 < plain["loop_instructions_per_logit"] < 40 and plain["instructions_outside_loop"] > 0
    assert tempered["loop_instructions_per_logit"] > plain["loop_instructions_per_logit"]
    assert layer_norm["kernel"] == "_electra_add_layer_norm_bwd" and gelu["kernel"] == "_electra_bias_gelu_bwd"
    assert all(20 < row["instructions_per_value"] < 100 for row in (layer_norm, gelu))
