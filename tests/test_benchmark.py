"""benchmarks/throughput.py end to end on CPU (tiny preset, a few steps), and the guard that its Hugging Face
baseline computes the same losses as our model."""
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is a folder of scripts, not an installed package

from benchmarks import hf_baseline  # noqa: E402
from benchmarks.throughput import RECORD_FIELDS, datasheet_peak  # noqa: E402
from conftest import child_env
from model_helpers import kernel_backend
from electra_ds.config import preset  # noqa: E402

CPU_VARIANTS = ["hf_eager", "ours_ds_torch", "ours_bare"]
TIMED_FIELDS = ("ms_per_step", "ms_p10", "ms_p90", "ms_wall_mean", "tokens_per_s", "tflops", "mfu_measured_peak",
                "peak_memory_mib", "hours_per_1m_steps", "executed_flops_per_step", "build_s", "warmup_s",
                "final_loss")


def test_throughput_cpu_end_to_end(tmp_path):
    out_json, out_md = tmp_path / "tp.json", tmp_path / "tp.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--device", "cpu", "--model_size", "tiny",
           "--batch_sizes", "2,3", "--max_length", "16", "--precision", "fp32", "--steps", "2", "--warmup", "1",
           "--variants", ",".join(CPU_VARIANTS + ["ours_ds_triton", "hf_compile_cudagraphs"]),
           "--json", str(out_json), "--markdown", str(out_md)]
    # one thread: on a busy 2-core machine, spinning OpenMP threads make tiny steps 10x slower
    env = child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]

    result = json.loads(out_json.read_text())
    meta = result["meta"]
    for key in ("model_size", "precision", "max_length", "max_predictions", "steps", "warmup", "environment",
                "matmul_peak", "datasheet_peak", "recipe", "fair_check", "elapsed_s"):
        assert key in meta, key
    env_info = meta["environment"]
    for key in ("device", "device_name", "torch", "cuda", "transformers", "deepspeed", "triton", "code"):
        assert key in env_info, key
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git clone: the record names the commit
        assert env_info["code"].startswith(head.stdout.strip())
    assert env_info["device"] == "cpu" and env_info["torch"] == torch.__version__
    assert meta["precision"] == "fp32" and meta["max_predictions"] == 2
    assert meta["matmul_peak"]["tflops"] > 0 and meta["datasheet_peak"] == {"name": "unknown", "tflops": None}
    assert meta["fair_check"]["ok"] and meta["fair_check"]["max_abs_diff"] <= 1e-4
    assert meta["recipe"]["pfs_days"] > 0

    assert [run["batch_size"] for run in result["runs"]] == [2, 3]
    for run in result["runs"]:
        assert run["tokens_per_step"] == run["batch_size"] * 16 and run["pfs_days_per_1m_steps"] > 0
        records = {v["name"]: v for v in run["variants"]}
        assert list(records) == CPU_VARIANTS + ["ours_ds_triton", "hf_compile_cudagraphs"]
        for v in run["variants"]:
            assert set(v) == set(RECORD_FIELDS), v["name"]
        for name in CPU_VARIANTS:
            v = records[name]
            assert v["status"] == "ok", (name, v["error"], v["traceback"])
            for key in TIMED_FIELDS:
                assert isinstance(v[key], float) and math.isfinite(v[key]) and v[key] > 0, (name, key, v[key])
            assert v["ms_p10"] <= v["ms_per_step"] <= v["ms_p90"] and len(v["step_ms"]) == 2
            assert v["tokens_per_s"] == pytest.approx(run["tokens_per_step"] / (v["ms_per_step"] / 1e3))
            assert v["mfu_datasheet"] is None and v["speedup_vs_hf_eager"] > 0
            if name != "hf_eager":  # ours, eager: counted by SyncCounter on the CPU (None for HF's)
                assert v["host_syncs_per_step"] == 0 and v["host_sync_sites"] == {}, (name, v["host_sync_sites"])
        assert records["hf_eager"]["speedup_vs_hf_eager"] == 1.0
        # the HF wiring runs its vocabulary head on every position, ours on the masked slots only
        assert records["hf_eager"]["executed_flops_per_step"] > records["ours_bare"]["executed_flops_per_step"]
        assert records["ours_ds_torch"]["kernels"] == "torch"
        assert set(run["engine_overhead_ms"]) == {"ours_ds_torch"}  # the same kernels as ours_bare on CPU
        fastest = run["fastest_engine_step"]  # the only engine variant that runs on a CPU
        assert fastest["name"] == "ours_ds_torch" and fastest["x_hf_compile_cudagraphs"] is None
        assert fastest["x_hf_eager"] == pytest.approx(records["hf_eager"]["ms_per_step"] / fastest["ms_per_step"])
        for name in ("ours_ds_triton", "hf_compile_cudagraphs"):
            assert records[name]["status"] == "skipped" and records[name]["error"] == "needs CUDA"

    table = out_md.read_text()
    assert table == proc.stdout[proc.stdout.index(table.splitlines()[0]):]
    assert "| 3 | ours_ds_torch | torch |" in table and "| 2 | ours_ds_triton | | skipped |" in table
    assert "Batch 3: fastest step through the DeepSpeed engine: ours_ds_torch, " in table


def test_host_syncs_are_counted_with_their_call_sites():
    from benchmarks.throughput import VARIANTS, count_host_syncs

    variant = {v.name: v for v in VARIANTS}
    x = torch.ones(3)

    def step(i):  # two reads on the host, on two lines of this file
        total = x.sum().item()
        return total + float(x[i])

    sites = count_host_syncs(step, 1, torch.device("cpu"), variant["ours_ds_torch"])
    assert sum(sites.values()) == 2 and len(sites) == 2 and all("test_benchmark.py:" in site for site in sites), sites
    assert count_host_syncs(step, 1, torch.device("cpu"), variant["hf_eager"]) is None  # not counted


def test_only_c10s_sync_warning_counts_as_a_host_sync():
    """Sync debug mode's one-off prototype warning, which names torch/cuda/__init__.py, once counted as a sync (the
    H200 run at 9d46b65 showed 1 per step for whichever variant ran first in a process)."""
    from benchmarks.throughput import sync_sites

    def caught(message, line):
        return warnings.WarningMessage(UserWarning(message), UserWarning, "site.py", line)

    sites = sync_sites([caught("Synchronization debug mode is a prototype feature and does not yet detect all "
                               "synchronizing operations", 1),
                        caught("called a synchronizing CUDA operation", 7),
                        caught("called a synchronizing CUDA operation", 7),
                        caught("an unrelated warning", 9)])
    assert sites == {"site.py:7": 2}


def test_datasheet_peak_matches_the_card_not_its_family():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == ("NVIDIA H100 SXM (dense bf16)", 989.0)
    assert datasheet_peak("NVIDIA H100 PCIe")[1] == 756.0
    assert datasheet_peak("NVIDIA H100 NVL")[1] is None  # no SXM peak for another card
    assert datasheet_peak("NVIDIA H200")[1] == 989.0 and datasheet_peak("NVIDIA A10G") == ("unknown", None)


def test_throughput_rejects_unknown_variant():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--variants", "hf_eager,fast"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ['fast']" in proc.stderr


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_hf_baseline_computes_our_losses(name):
    check = hf_baseline.check_same_loss(preset(name), batch_size=2, max_length=24)
    assert check.max_abs_diff <= 1e-4
    assert abs(check.ours_disc - math.log(2)) > 1e-2  # far from chance: the labels and masks matter


def test_the_guard_catches_a_wrong_wiring(monkeypatch):
    """A classic wiring bug: the HF generator reads the original tokens instead of the masked ones."""
    forward = hf_baseline.HFElectraPretraining.forward

    def unmasked(self, input_ids, attention_mask, token_type_ids, plan, disc_input=None):
        return forward(self, input_ids, attention_mask, token_type_ids, plan._replace(generator_input_ids=input_ids),
                       disc_input)

    monkeypatch.setattr(hf_baseline.HFElectraPretraining, "forward", unmasked)
    with pytest.raises(AssertionError, match="does not compute our losses"):
        hf_baseline.check_same_loss(preset("tiny"), batch_size=2, max_length=24)


def test_step_profile_on_cpu_and_kernel_families():
    from benchmarks import step_profile

    x = torch.randn(64, 64, requires_grad=True)
    profile = step_profile.profile_steps(lambda i: (x @ x).relu().sum().backward(), 0, 2, torch.device("cpu"))
    assert profile["profiled_steps"] == 2 and profile["gpu_busy_ms_per_step"] is None
    assert any("mm" in op["name"] for op in profile["top_ops"]), profile["top_ops"]
    assert "operators by own CPU time" in step_profile.markdown("cpu", 1.0, profile)

    assert profile["gpu_annotations"] is None
    # The optimizer's record_function region lies on the GPU's timeline over its kernels: kept apart, not summed
    from types import SimpleNamespace as Event
    events = [Event(key="_electra_adam_step", device_type="cuda", self_device_time_total=90.0, count=2,
                    is_user_annotation=False),
              Event(key="Optimizer.step#ElectraAdam.step", device_type="cuda", self_device_time_total=140.0, count=1,
                    is_user_annotation=True),
              Event(key="aten::mm", device_type="cpu", self_device_time_total=0.0, count=3, is_user_annotation=False)]
    assert step_profile.device_events(events, "cuda") == ([("_electra_adam_step", 90.0, 2)],
                                                          [("Optimizer.step#ElectraAdam.step", 140.0, 1)])

    # Idle time: gaps between kernels on any stream (an overlapping kernel on a second stream closes no gap)
    idle = step_profile.idle_gaps([(0.0, 10.0, "a"), (5.0, 30.0, "b"), (12.0, 20.0, "side"), (50.0, 60.0, "c"),
                                   (61.0, 70.0, "d")], steps=2)
    assert idle == {"idle_ms_per_step": 0.0105, "gaps_per_step": 1.0, "between_steps_ms_per_step": None,
                    "longest": [{"us": 20.0, "after": "b", "before": "c"}, {"us": 1.0, "after": "c", "before": "d"}]}
    assert step_profile.idle_gaps([], steps=1) is None
    # With each step's span on the GPU: idle inside the steps, and the host's turn between them apart
    kernels = [(0.0, 10.0, "a"), (5.0, 30.0, "b"), (50.0, 60.0, "c"), (61.0, 70.0, "d")]
    inside = step_profile.idle_gaps(kernels, steps=2, windows=[(0.0, 30.0), (50.0, 70.0)])
    assert inside == {"idle_ms_per_step": 0.0005, "gaps_per_step": 0.5, "between_steps_ms_per_step": 0.01,
                      "longest": [{"us": 1.0, "after": "c", "before": "d"}]}
    overlapping = step_profile.idle_gaps(kernels, steps=2, windows=[(0.0, 40.0), (50.0, 70.0)])
    assert overlapping["longest"][0] == {"us": 10.0, "after": "b", "before": "c"}
    assert overlapping["between_steps_ms_per_step"] == pytest.approx(0.005)
    # A step's span: from its region's start to the last kernel before the next step's region (backward included)
    assert step_profile.step_windows(kernels + [(35.0, 45.0, "late")], [0.0, 48.0]) == [(0.0, 45.0), (48.0, 70.0)]
    assert step_profile.step_windows(kernels, [0.0, 80.0]) == [(0.0, 70.0)]  # a region with no kernel after it
    # The first step's kernels in launch order, timed from the step's start
    assert step_profile.step_timeline(kernels, (50.0, 70.0)) == [{"name": "c", "start_us": 0.0, "us": 10.0},
                                                                 {"name": "d", "start_us": 11.0, "us": 9.0}]
    timeline = [{"name": n} for n in ("gemm_a", "Memset (Device)", "triton_b", "Memset (Device)", "gemm_a",
                                      "Memcpy DtoD (Device -> Device)", "triton_b")]
    assert step_profile.copies_after(timeline) == [{"after": "gemm_a", "count": 2}, {"after": "triton_b", "count": 1}]

    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n": "matmul", "nvjet_tst_128x64_64x8_1x1_v_bz_TNT": "matmul",
             "pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "attention",
             "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
             "_electra_xentropy_sample_fwd": "electra_ds Triton kernels",
             "triton_per_fused__to_copy_add_native_layer_norm_7": "inductor (torch.compile)",
             "Memcpy DtoD (Device -> Device)": "copy / fill", "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
             "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, float>": "other"}
    assert {name: step_profile.category(name) for name in names} == names
    gpu = {"gpu_busy_ms_per_step": 6.0, "gpu_kernels_per_step": 412.0, "top_ops": profile["top_ops"],
           "ms_per_kernel_family": {"matmul": 3.5, "inductor (torch.compile)": 2.5}}
    head = step_profile.markdown("ours", 8.0, gpu).splitlines()[0]
    assert head == ("**ours**: GPU busy 6.00 ms of a 8.00 ms step (75%), 412 kernels per step; by family: "
                    "matmul 3.50 ms, inductor (torch.compile) 2.50 ms")
    gpu["kernels_per_family"] = {"matmul": 100.0, "inductor (torch.compile)": 312.0}
    assert step_profile.markdown("ours", 8.0, gpu).splitlines()[0].endswith(
        "by family: matmul 3.50 ms (100 kernels), inductor (torch.compile) 2.50 ms (312 kernels)")
    gpu["gpu_annotations"] = [{"name": "Optimizer.step#ElectraAdam.step", "span_ms_per_step": 0.14}]
    gpu["gpu_idle"] = idle
    assert step_profile.markdown("ours", 8.0, gpu).splitlines()[0].endswith(
        "(312 kernels); GPU idle 0.01 ms per step in 1 gaps, the longest 20 us before `c`, 1 us before `d`; regions "
        "on the GPU timeline, not in the busy time: Optimizer.step#ElectraAdam.step 0.14 ms")
    gpu["gpu_idle"] = inside
    assert "; GPU idle 0.00 ms per step inside the step in 0.5 gaps (and 0.01 ms between steps), the longest 1 us " \
           "before `d`;" in step_profile.markdown("ours", 8.0, gpu).splitlines()[0]
    gpu["timeline"] = timeline
    assert "before `d`; copies and fills follow `gemm_a` (2), `triton_b` (1); regions" in \
        step_profile.markdown("ours", 8.0, gpu).splitlines()[0]


GENERATED_MODULE = """
triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''
@triton_heuristics.pointwise(
    inductor_meta={'kernel_name': 'triton_poi_fused_add_0', 'kernel_num_gb': 0.0504},
)
''', device_str='cuda')

triton_red_fused_sum_1 = async_compile.triton('triton_red_fused_sum_1', '''
@triton_heuristics.reduction(
    inductor_meta={'kernel_name': 'triton_red_fused_sum_1', 'kernel_num_gb': %s},
)
''', device_str='cuda')

triton_per_fused_2 = async_compile.triton('triton_per_fused_2', '''
@triton_heuristics.persistent_reduction(inductor_meta={'kernel_name': 'triton_per_fused_2'})
''', device_str='cuda')
"""


def test_kernel_bandwidth_from_inductors_byte_estimates(tmp_path):
    """The profile's kernels get the bandwidth they reached from the bytes inductor estimated for them (read from the
    generated modules' code); a kernel without an estimate, or whose name two graphs give different estimates, gets
    none."""
    from types import SimpleNamespace

    from benchmarks import step_profile

    forward, backward = tmp_path / "forward.py", tmp_path / "backward.py"
    forward.write_text(GENERATED_MODULE % "0.0005")
    backward.write_text((GENERATED_MODULE % "0.0009").replace("_add_0", "_mul_0"))
    assert step_profile.kernel_gigabytes(forward.read_text()) == {"triton_poi_fused_add_0": 0.0504,
                                                                  "triton_red_fused_sum_1": 0.0005}
    gigabytes = step_profile.generated_kernel_gigabytes(
        [SimpleNamespace(__file__=str(forward)), SimpleNamespace(__file__=str(backward)), SimpleNamespace()])
    assert gigabytes == {"triton_poi_fused_add_0": 0.0504, "triton_poi_fused_mul_0": 0.0504}
    profile = {"gpu_busy_ms_per_step": 1.0, "gpu_kernels_per_step": 40.0, "ms_per_kernel_family": {"x": 1.0},
               "top_ops": [{"name": "triton_poi_fused_add_0", "ms_per_step": 0.024, "calls_per_step": 12.0},
                           {"name": "triton_poi_fused_mul_0", "ms_per_step": 0.084, "calls_per_step": 2.0},
                           {"name": "triton_red_fused_sum_1", "ms_per_step": 0.5, "calls_per_step": 24.0},
                           {"name": "sm90_xmma_gemm", "ms_per_step": 0.3, "calls_per_step": 2.0}]}
    step_profile.add_bandwidth(profile, gigabytes)
    add, mul, unknown, gemm = profile["top_ops"]
    assert add["gb_per_call"] == 0.0504 and math.isclose(add["tb_per_s"], 0.0504 * 12 / 0.024)
    assert math.isclose(mul["tb_per_s"], 1.2) and "tb_per_s" not in unknown and "tb_per_s" not in gemm
    bandwidth = profile["kernel_bandwidth"]
    assert math.isclose(bandwidth["all"]["gb_per_step"], 0.0504 * 14)
    assert math.isclose(bandwidth["all"]["tb_per_s"], 0.0504 * 14 / 0.108)
    assert list(bandwidth["by_launch_size"]) == [">= 40 MB"] and bandwidth["all"]["calls_per_step"] == 14
    text = step_profile.markdown("ours", 2.0, profile)
    assert "inductor's kernels with a bytes estimate: all 0.11 ms for 0.71 GB (6.53 TB/s), >= 40 MB a launch" in text
    assert "| `triton_poi_fused_add_0` | 0.024 | 12 | 25.20 |" in text and "| `sm90_xmma_gemm` | 0.300 | 2 |  |" in text
    none = {"top_ops": [dict(unknown)], "gpu_busy_ms_per_step": 1.0}
    step_profile.add_bandwidth(none, gigabytes)
    assert none["kernel_bandwidth"] is None


def test_gpu_check_packs_its_results_into_one_archive_beside_the_log(tmp_path):
    """The device tool brings back at most 8 files: gpu_check.sh's pack_results leaves gpu_check.log and one archive
    holding everything else (10 files after a run with two inductor sets)."""
    import re
    import tarfile

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    function = re.search(r"^pack_results\(\) \{\n.*?^\}\n", script, re.MULTILINE | re.DOTALL).group(0)
    out = tmp_path / "out"
    out.mkdir()
    names = ["throughput.json", "throughput.md", "kernels.json", "sweep.json", "sweep.md"] + \
        [f"inductor_{n}.{ext}" for n in (1, 2) for ext in ("json", "md")]
    for name in names + ["gpu_check.log"]:
        (out / name).write_text(name)
    subprocess.run(["bash", "-c", function + "pack_results"], env={"OUT": str(out), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.tar.gz"]
    with tarfile.open(out / "results.tar.gz") as archive:
        assert sorted(archive.getnames()) == sorted(names)
        assert archive.extractfile("kernels.json").read() == b"kernels.json"


def test_gpu_check_passes_a_sets_electra_ds_tokens_as_environment(tmp_path):
    """An INDUCTOR_SETS entry's ELECTRA_DS_* tokens become the environment of its throughput run, the others
    --inductor flags; a set without such tokens runs in the unchanged environment."""
    import re

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    function = re.search(r"^split_set\(\) \{\n.*?^\}\n", script, re.MULTILINE | re.DOTALL).group(0)
    show = ('env "${SET_ENV[@]}" sh -c \'echo "env=${ELECTRA_DS_COMPILED_LAYER_NORM:-unset}"\'; '
            'echo "flags=${SET_FLAGS[*]}"')
    for tokens, expected in (("combo_kernels=True ELECTRA_DS_COMPILED_LAYER_NORM=opaque a=1",
                              "env=opaque\nflags=--inductor=combo_kernels=True --inductor=a=1\n"),
                             ("combo_kernels=True", "env=unset\nflags=--inductor=combo_kernels=True\n"),
                             ("ELECTRA_DS_COMPILED_LAYER_NORM=opaque", "env=opaque\nflags=\n")):
        run = subprocess.run(["bash", "-c", f"set -uo pipefail; {function}split_set {tokens}; {show}"],
                             capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"}, check=True)
        assert run.stdout == expected, (tokens, run.stdout)


@pytest.mark.parametrize("fake_nvidia_smi", [False, True])
def test_gpu_check_without_a_gpu_says_so_and_succeeds(tmp_path, fake_nvidia_smi):
    """benchmarks/gpu_check.sh on a machine without a GPU: without nvidia-smi it stops at once; with an
    nvidia-smi that works but no CUDA torch, after the set-up and versions stage. Both exit 0 and leave the log."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "benchmarks" / "gpu_check.sh").write_text((ROOT / "benchmarks" / "gpu_check.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "python3", "dirname", "mkdir", "tee", "timeout", "ls", "cat"):
        path = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        if path:
            (bin_dir / tool).symlink_to(path)
    if fake_nvidia_smi:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake GPU'\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = child_env(PATH=str(bin_dir), OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    if fake_nvidia_smi:
        assert "no .whl/ here" in log and "python3 torch" in log and "torch sees no CUDA device" in log, log
    else:
        assert "no NVIDIA GPU here" in log and "python3 torch" not in log, log


def test_kernel_speed_cases_run_on_small_shapes():
    """benchmarks/kernel_speed.py times CUDA only; its cases (our ops and the plain torch ops they replace, forward
    and backward) are checked here on the CPU at small sizes, so the GPU run does not meet a broken call."""
    from benchmarks import kernel_speed

    torch.manual_seed(0)
    cases = kernel_speed.cases("cpu", tokens=64, masked=8, hidden=64, ffn=96, vocab=50, params=100)
    assert set(cases) == {"add_layer_norm fwd+bwd", "dropout + add_layer_norm fwd+bwd",
                          "bias + dropout + add_layer_norm fwd+bwd", "bias_gelu fwd+bwd",
                          "cross_entropy_and_sample fwd+bwd", "sigmoid_bce fwd+bwd", "adam_step"}
    for name, (ours, native) in cases.items():
        a, b = ours(), native()
        if "dropout" in name:  # the same function with other noise: x's gradient has dropped zeros in both
            assert [x.shape for x in a] == [y.shape for y in b] and (a[0] == 0).any() and (b[0] == 0).any()
        elif name.endswith("fwd+bwd"):  # the input gradients of the same function
            for x, y in zip(a, b):
                torch.testing.assert_close(x.float(), y.float(), atol=0.05, rtol=0.05, msg=name)


def test_kernel_speed_compiled_cases_run_on_small_shapes():
    """The LayerNorm and GELU cases that kernel_speed.py times under torch.compile (here traced: the twin in
    inductor's code) compile and run on the CPU and give the twin's gradients on their inputs (dropout mask
    included)."""
    from benchmarks import kernel_speed
    from electra_ds.kernels import reference

    torch.manual_seed(0)
    eager = kernel_speed.cases("cpu", tokens=64, hidden=32, ffn=96, vocab=50, params=100)
    with kernel_backend("torch"):
        torch._dynamo.reset()
        torch.manual_seed(1)
        compiled = kernel_speed.compiled_cases("cpu", tokens=64, hidden=32)
        torch.manual_seed(1)
        inputs = kernel_speed.layer_norm_inputs("cpu", 64, 32)
        gelu_inputs = kernel_speed.gelu_inputs("cpu", 64, 4 * 32)  # drawn after those, as compiled_cases does
        assert set(compiled) <= set(eager) and len(compiled) == 3
        for name, fn in compiled.items():
            if name.startswith("bias_gelu"):
                args = [t.detach().clone().requires_grad_() for t in gelu_inputs]
                out = reference.bias_gelu(*args)
            else:
                args = [t.detach().clone().requires_grad_() for t in inputs + inputs[3:] * name.startswith("bias")]
                out = reference.add_layer_norm(*args[:4], 1e-12, 0.1, torch.tensor(0), *args[4:])
            expected = torch.autograd.grad(out, args, torch.ones_like(out))
            grads = fn()
            assert len(grads) == len(expected) and ((grads[0] == 0).any() or "gelu" in name), name
            for got, want in zip(grads, expected):
                torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02, msg=name)


def test_kernel_speed_attention_cases_run_on_small_shapes():
    """The attention cases (SDPA and ours, forward and backward per tower, with and without a padding mask) run on the
    CPU (SDPA's MATH backend, our twin): without dropout both give the same QKV gradient, and a padded key gets no
    gradient, a real one does."""
    from benchmarks import kernel_speed

    torch.manual_seed(0)
    cases = kernel_speed.attention_cases("cpu", batch=2, length=20, head_dim=8, dropout=0.0)
    assert set(cases) == {"discriminator (4 heads) no mask", "discriminator (4 heads) padding mask",
                          "generator (1 heads) no mask", "generator (1 heads) padding mask"}
    for name, (sdpa, ours) in cases.items():
        (grad,), (ours_grad,) = kernel_speed._with_backend(sdpa, "MATH")(), ours()
        heads = 4 if name.startswith("discriminator") else 1
        assert grad.shape == (2, 20, 3 * heads * 8)
        torch.testing.assert_close(ours_grad.float(), grad.float(), atol=0.05, rtol=0.05, msg=name)
        key_grad = grad[0, :, heads * 8:2 * heads * 8].float().abs().sum(dim=1)  # row 0: padded in the mask case
        assert bool((key_grad[:4] > 0).all())
        assert bool((key_grad[4:] == 0).all()) == name.endswith("padding mask"), name


def test_data_pipeline_benchmark_runs_and_reports(tmp_path):
    """benchmarks/data_pipeline.py on a small made corpus: raw encoding, the build per worker count and every
    sampler layout are timed and written to its JSON."""
    from benchmarks import data_pipeline

    words = "the of and to in a is that for it as was with be by on not he this are".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=rng.integers(5, 80))) for _ in range(300)]
    (tmp_path / "t.txt").write_text("\n\n".join(docs))
    out = tmp_path / "dp.json"
    assert data_pipeline.main(["--source", str(tmp_path / "t.txt"), "--doc_split", "blank_lines", "--vocab_size",
                               "200", "--workers", "1", "--sampler_seconds", "0.1", "--many_shards", "4",
                               "--max_length", "32", "--batch_size", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["raw"]) == {"encode_batch_fast", "encode_batch"} and set(result["build"]) == {"workers=1"}
    assert result["build"]["workers=1"]["tokens_per_s"] > 0
    layouts = sorted(name.split(", ")[1] for name in result["sampler"])
    assert layouts == sorted(["one segment", "two segments", "packed"] * 2)  # one shard, then more shards
    assert all(r["positions_per_s"] > 0 for r in result["sampler"].values())


def test_kernel_speed_row_cases_run_on_small_shapes():
    """The LayerNorm and GELU cases that kernel_speed.py --row_configs times (per tower: the discriminator's width,
    then the generator's) give the twins' input gradients, the LayerNorm's under seed 0 with the dense bias."""
    from benchmarks import kernel_speed
    from electra_ds.kernels import reference

    with kernel_backend("torch"):
        torch.manual_seed(0)
        cases = kernel_speed.row_cases("cpu", tokens=64)
        torch.manual_seed(0)
        for tower, hidden in (("discriminator", 256), ("generator", 64)):
            x, r, w, b = kernel_speed.layer_norm_inputs("cpu", 64, hidden)
            leaves = [t.detach().requires_grad_() for t in (x, r, w, b, b)]  # the bias is also the dense bias
            out = reference.add_layer_norm(*leaves[:4], 1e-12, 0.1, torch.tensor(0), leaves[4])
            expected = torch.autograd.grad(out, leaves, torch.ones_like(out))
            h, hb = (t.detach().requires_grad_() for t in kernel_speed.gelu_inputs("cpu", 64, 4 * hidden))
            gelu_expected = torch.autograd.grad(reference.bias_gelu(h, hb), (h, hb), torch.ones(64, 4 * hidden))
            for got, want in zip(cases["layer_norm"][tower](), expected):
                torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02, msg=tower)
            for got, want in zip(cases["gelu"][tower](), gelu_expected):
                torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02, msg=tower)
