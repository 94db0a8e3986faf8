"""benchmarks/inductor_census.py: the kernels that torch.compile generates for a training step on an sm_90 GPU,
counted without one (in a process of its own: it patches inductor process-wide)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from electra_ds.config import preset

ROOT = Path(__file__).resolve().parents[1]


def _census(tmp_path, *flags: str) -> tuple[dict, str]:
    pytest.importorskip("triton")
    out = tmp_path / "census.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --build needs Triton's compiler
    run = subprocess.run([sys.executable, "benchmarks/inductor_census.py", "--model_size", "tiny", "--batch_size", "4",
                          "--max_length", "32", "--json", str(out), *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())["graphs"], run.stdout


# Combo kernels (on by default, pretrain.COMPILE_DEFAULTS) name a launch after none of the ops it fuses: the tests
# that read kernels' names count them before combining.
SEPARATE = ("--inductor", "combo_kernels=False")


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> tuple[dict, str]:
    """The census with traced LayerNorms and GELUs (the default) and kernels not combined, run once for the module."""
    return _census(tmp_path_factory.mktemp("traced"), *SEPARATE)


def test_compiled_step_launches_no_kernel_per_dropout_site(traced):
    """The tiny preset's training step, as inductor would launch it on an H100/H200: the masking, forward and
    backward graphs, each with Triton kernels, the forward and backward with their matrix products and our opaque
    ops (attention, the generator head), and no kernel that mixes one seed (integer XORs over one value) in the
    forward or backward: each dropout site's key came from such a kernel, in the forward and again in the backward
    (74 + 48 of them in ELECTRA-Small), before the sites' keys were made in one op per tower
    (`model.layers.dropout_sites`); the masking mixes its seed once."""
    graphs, stdout = traced
    assert list(graphs) == ["masking", "forward", "backward"]
    assert all(g["triton_kernels"] > 0 for g in graphs.values())
    assert graphs["forward"]["extern_kernels"] and graphs["backward"]["extern_kernels"]
    tiny = preset("tiny")
    layers = tiny.discriminator.num_hidden_layers + tiny.generator.num_hidden_layers
    assert graphs["forward"]["ops"]["torch.ops.electra_ds.attention"] == layers
    assert graphs["backward"]["ops"]["torch.ops.electra_ds.attention_backward"] == layers
    seed_kernels = {g: [k for k in graphs[g]["one_value_kernels"] if "bitwise_xor" in k] for g in graphs}
    assert seed_kernels["forward"] == seed_kernels["backward"] == [] and len(seed_kernels["masking"]) <= 1
    assert "Triton kernels" in stdout and "traced LayerNorms" in stdout
    assert "torch.ops.electra_ds.add_layer_norm" not in graphs["forward"]["ops"]


def test_opaque_layer_norms_and_gelus_are_one_op_each_way(tmp_path, traced):
    """With --compiled_gelu opaque each bias + GELU (one per encoder layer, one per tower's head) is our op in the
    forward and our backward op in the backward, and no inductor kernel computes a GELU.
    With --compiled_layer_norm opaque each encoder layer's two LayerNorms are our op in the forward and our
    backward op in the backward, and only the embeddings' and the generator head's LayerNorms leave inductor kernels
    computing a LayerNorm backward (21 such launches traced, 5 opaque in the tiny preset's step). The gradient our
    backward op takes, a hidden state's two gradients summed, comes from an addmm (the layers work on rows: no view
    between the matrix product and the add), not from a kernel of its own: one addmm at least for each LayerNorm
    whose output two ops read (all but each tower's last; the tiny step's backward has 7 addmm)."""
    graphs, stdout = _census(tmp_path, "--compiled_layer_norm", "opaque", "--compiled_gelu", "opaque", *SEPARATE)
    tiny = preset("tiny")
    norms = 2 * (tiny.discriminator.num_hidden_layers + tiny.generator.num_hidden_layers)
    assert graphs["forward"]["ops"]["torch.ops.electra_ds.bias_gelu"] == norms // 2 + 2
    assert graphs["backward"]["ops"]["torch.ops.electra_ds.bias_gelu_backward"] == norms // 2 + 2
    # (a kernel is named after the ops it fuses, ours too: "bias_gelu_backward" where it reads our op's gradient)
    assert not [name for g in graphs.values() for name, _ in g["by_name"] if "gelu" in name.replace("bias_gelu", "")]
    assert [name for name, _ in traced[0]["forward"]["by_name"] if "gelu" in name]
    assert graphs["forward"]["ops"]["torch.ops.electra_ds.add_layer_norm"] == norms
    assert graphs["backward"]["ops"]["torch.ops.electra_ds.add_layer_norm_backward"] == norms

    def norm_backward_kernels(census: dict) -> int:
        return sum(n for name, n in census["backward"]["by_name"] if "native_layer_norm_backward" in name)

    assert 0 < norm_backward_kernels(graphs) < norm_backward_kernels(traced[0])
    assert graphs["backward"]["extern_kernels"]["extern_kernels.addmm"] >= norms - 2
    assert not [name for name, _ in graphs["backward"]["by_name"] if "add_layer_norm_backward" in name]
    assert "opaque LayerNorms, opaque GELUs" in stdout


def test_traced_gelus_store_their_slope_for_the_backward(traced):
    """Each encoder layer's traced bias + GELU computes its slope in the forward kernel beside its output and stores
    it (kernels._TracedBiasGelu): no backward kernel computes a GELU but where the partitioner recomputes the
    generator head's, at the masked positions only, fused into its LayerNorm's backward."""
    graphs, _ = traced
    tiny = preset("tiny")
    layers = tiny.discriminator.num_hidden_layers + tiny.generator.num_hidden_layers
    stores = sum(n for name, n in graphs["forward"]["by_name"] if "erf_exp_gelu" in name and "round" in name)
    assert stores >= layers
    recomputed = [(name, n) for name, n in graphs["backward"]["by_name"] if "erf" in name or "gelu" in name]
    assert all("native_layer_norm_backward" in name for name, _ in recomputed) and sum(n for _, n in recomputed) <= 2
    # inductor's bytes estimate for each such kernel: 2 bytes a value read, 2 written and 2 of slope, and the bias
    # (a slice of the parameters' flat buffer, counted as up to 4 bytes a value); the encoder layers' GELUs and the
    # discriminator head's
    rows = 4 * 32
    sizes = [rows * tiny.discriminator.intermediate_size, rows * tiny.generator.intermediate_size,
             rows * tiny.discriminator.hidden_size]
    moved = [gb * 1e9 / n for name, n, gb in graphs["forward"]["gigabytes_by_kernel"]
             if "erf_exp_gelu" in name and "round" in name]
    assert len(moved) >= layers and all(any(6 * v <= b <= 10 * v for v in sizes) for b in moved), moved


def test_only_the_word_embeddings_scatter_add(traced):
    """The backward's only atomic adds are the word embeddings' lookups, one per tower: the token types' table (all of a
    batch's tokens in one or two rows, whose atomics the memory serialises) gets a sum per type instead
    (kernels.token_type_embedding)."""
    graphs, _ = traced
    assert graphs["backward"]["atomic_adds"] == 2
    assert graphs["forward"]["atomic_adds"] == graphs["masking"]["atomic_adds"] == 0


def test_combo_kernels_and_dependent_launches_do_the_same_and_build_for_sm90(tmp_path, traced):
    """By default (pretrain.COMPILE_DEFAULTS) the forward's and backward's independent kernels launch combined: fewer
    Triton launches (ELECTRA-Small, torch 2.11: 282 against 632), the same matrix products, our ops, atomic adds and
    bytes moved; the masking, compiled without our defaults, has as many. With triton.enable_pdl=True (opt-in)
    kernels await their predecessor's results in the kernel (`gdc_wait`) instead of at launch. --build compiles every
    generated kernel for sm_90 under each config its autotuner would try: none fails (the exit status), each reports
    its registers. --profile matches a GPU profile's kernels with the census's by name and gives their bandwidth."""
    separate = traced[0]
    kernel, launches, gb = separate["masking"]["gigabytes_by_kernel"][0]  # the masking is compiled alike in both
    profile = {"gpu_busy_ms_per_step": 0.5,
               "top_ops": [{"name": kernel, "ms_per_step": 0.002, "calls_per_step": launches}]}
    profiled = {"runs": [{"batch_size": 4, "variants": [{"name": "ours", "ms_per_step": 1.0, "profile": profile}]}]}
    (tmp_path / "profiled.json").write_text(json.dumps(profiled))
    graphs, stdout = _census(tmp_path, "--build", "--inductor", "triton.enable_pdl=True",
                             "--profile", str(tmp_path / "profiled.json"))
    assert "**ours (batch 4)**: GPU busy 0.50 ms" in stdout and f"({gb / 0.002:.2f} TB/s)" in stdout
    assert "'combo_kernels': True" in stdout and "'combo_kernels': False" in traced[1]
    assert graphs["masking"]["triton_kernels"] == separate["masking"]["triton_kernels"]
    for name in ("forward", "backward"):
        assert 0 < graphs[name]["triton_kernels"] < separate[name]["triton_kernels"], name
        for count in ("extern_kernels", "ops", "atomic_adds"):
            assert graphs[name][count] == separate[name][count], (name, count)
        if graphs[name]["kernels_without_gigabytes"] == 0:  # torch 2.11's combo kernels carry no bytes estimate
            assert graphs[name]["gigabytes"] == pytest.approx(separate[name]["gigabytes"], rel=1e-6), name
        assert graphs[name]["pdl_waits"] >= 1 and separate[name]["pdl_waits"] == 0
    built = json.loads((tmp_path / "census.json").read_text())["build"]
    assert "built for sm_90" in stdout and ", 0 failed;" in stdout
    assert len({b["source"] for b in built}) >= len({name for g in graphs.values() for name, _ in g["by_name"]})
    assert all(b["registers"] > 0 and b["shared"] >= 0 for b in built)
