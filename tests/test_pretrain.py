"""Pretraining loop on DeepSpeed's CPU accelerator: optimizer, schedule, JSON configs, the real engine in fp32,
bf16 and fp16 with ZeRO 0/2/3, checkpoint/resume (SIGKILL, SIGTERM, truncated checkpoint), logging, bad input.

Runs in-process where it can (one process group of size 1 for the whole module); kills need subprocesses.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import child_env, saved_environ
from electra_ds.data.cache import TokenCache
from electra_ds.seeding import derive_seed
from electra_ds.train import engine as ds_engine
from electra_ds.train.checkpoint import MANIFEST, PARTIAL, CheckpointError, CheckpointManager
from electra_ds.train.engine import DSConfigError, linear_warmup_decay, load_ds_config
from electra_ds.train.metrics_log import CollapseMonitor, MetricsFile
from electra_ds.train.optim import ElectraAdam
from electra_ds.train import pretrain
from electra_ds.train.pretrain import (NonFiniteError, SetupError, grad_norm, make_plan, parse_args, prepare_cache,
                                       run)

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("fp32", "fp16", "bf16", "bf16_zero1", "bf16_zero2", "bf16_zero3", "bf16_zero2_offload")


pytestmark = pytest.mark.usefixtures("restore_environ")


def argv(data: Path, out: Path, *extra: str, steps: int = 6, batch: int = 4) -> list[str]:
    return ["--model_size", "tiny", "--data", str(data), "--output_dir", str(out), "--max_length", "32",
            "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--warmup_steps", "2",
            "--logging_steps", str(batch), "--eval_steps", str(batch * steps), "--eval_batches", "2",
            "--save_steps", str(batch * 1000), "--wandb", "disabled", "--num_workers", "0", "--no-export_hf",
            "--deepspeed_config", "fp32", *extra]


def train(data: Path, out: Path, *extra: str, **kw) -> list[dict]:
    run(parse_args(argv(data, out, *extra, **kw)))
    return MetricsFile(out / "metrics.jsonl").records()


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def start(data: Path, out: Path, *extra: str, kill_at: str | None = None, start_new_session: bool = False,
          **kw) -> subprocess.Popen:
    """launch/pretrain.py in a subprocess (in a process group of its own if `start_new_session`); its output goes
    to OUT.log (a pipe could fill and block it). With `kill_at` (a key of KILL_POINTS) the process SIGKILLs itself
    there instead (`KILLED_AT`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(out.with_suffix(".log"), "w")
    program = [str(REPO / "launch" / "pretrain.py")] if kill_at is None else ["-c", KILLED_AT, kill_at]
    proc = subprocess.Popen([sys.executable, *program, *argv(data, out, *extra, **kw)],
                            env=child_env(), stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            start_new_session=start_new_session)
    proc.log_path = out.with_suffix(".log")
    return proc


def output_of(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    """Poll `predicate` until it holds. Make it one that stays true once true (a condition that can pass between
    two polls, e.g. a checkpoint that pruning deletes, is missed by a poller the machine's load holds back), and
    the timeout generous: the subprocess's start-up alone can take minutes on a loaded machine."""
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the condition:\n{output_of(proc)}")
        if time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"timed out waiting ({timeout:.0f} s):\n{output_of(proc)}")
        time.sleep(0.05)


# -- pieces ----------------------------------------------------------------------------------------------------


def test_schedule_is_warmup_times_linear_decay():
    f = linear_warmup_decay(10, 100)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5 * 0.95)
    assert f(10) == pytest.approx(0.9)
    assert f(50) == pytest.approx(0.5)
    assert f(100) == 0.0 and f(150) == 0.0
    assert linear_warmup_decay(0, 10)(0) == 1.0


def test_electra_adam_is_adam_without_bias_correction_with_decoupled_decay():
    torch.manual_seed(0)
    decay, no_decay = torch.nn.Parameter(torch.randn(50)), torch.nn.Parameter(torch.randn(7))
    ref = [decay.detach().clone().double(), no_decay.detach().clone().double()]
    opt = ElectraAdam([{"params": [decay], "weight_decay": 0.01}, {"params": [no_decay], "weight_decay": 0.0}],
                      lr=0.1, betas=(0.9, 0.999), eps=1e-6)
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    for _ in range(3):
        grads = [torch.randn(50), torch.randn(7)]
        decay.grad, no_decay.grad = grads[0].clone(), grads[1].clone()
        opt.step()
        for i, (g, wd) in enumerate(zip(grads, (0.01, 0.0))):
            g = g.double()
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            ref[i] = ref[i] - 0.1 * (m[i] / (v[i].sqrt() + 1e-6) + wd * ref[i])
    torch.testing.assert_close(decay.detach().double(), ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(no_decay.detach().double(), ref[1], rtol=1e-5, atol=1e-6)


def test_electra_adam_clips_only_above_max_grad_norm():
    """The clipping coefficient is min(1, max_grad_norm / norm): a gradient norm below the limit steps unclipped."""
    grad = torch.randn(64, generator=torch.Generator().manual_seed(0))
    grad /= grad.norm()  # norm 1, far below 100
    results = []
    for max_grad_norm in (0.0, 100.0):  # 0: no clipping
        p = torch.nn.Parameter(torch.ones(64))
        opt = ElectraAdam([p], lr=0.1, weight_decay=0.01, max_grad_norm=max_grad_norm)
        p.grad = grad.clone()
        opt.step()
        results.append((p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()))
    assert float(opt.grad_norm) == pytest.approx(1.0, rel=1e-5)
    for clipped, unclipped in zip(*results):
        assert torch.equal(clipped, unclipped)
    torch.testing.assert_close(results[1][1], 0.1 * grad)  # exp_avg = (1 - beta1) x the unscaled gradient


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_ds_configs_fill_auto_batch_sizes(name):
    config = load_ds_config(name, micro_batch_size=4, gradient_accumulation_steps=3, world_size=2)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (4, 3, 24)
    assert config["gradient_clipping"] == 1.0
    assert not any(k.startswith("_") for k in config)


@pytest.mark.parametrize("bad, message", [
    ({"zero_optimisation": {"stage": 2}}, "'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "zero_optimization.overlap_com"),
    ({"bf16": {"enabled": True, "loss_scale": 1}}, "bf16.loss_scale"),
    ({"train_batch_size": 10}, "train_batch_size is 10 but the command line gives 8"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu is 3"),
    ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
    ({"gradient_clipping": "auto"}, "gradient_clipping"),
    ({"fp16": {"enabled": True}}, "fp16 needs zero_optimization.stage >= 1"),
    ({"managed_gradient_accumulation": False}, "every engine.step() an optimizer step"),
])
def test_bad_ds_config_names_the_key(bad, message):
    with pytest.raises(DSConfigError) as err:
        load_ds_config(bad, micro_batch_size=4, gradient_accumulation_steps=1, world_size=2)
    assert message in str(err.value)


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "bf16": {"enabled": true},\n  "gradient_clipping": \n}')
    with pytest.raises(DSConfigError, match=r"broken.json: line 4"):
        load_ds_config(path, micro_batch_size=1, gradient_accumulation_steps=1, world_size=1)


def test_seeds_are_distinct_per_step_rank_and_stream():
    seeds = {derive_seed(42, step, rank, stream) for step in range(50) for rank in range(4) for stream in (1, 2)}
    assert len(seeds) == 400
    assert derive_seed(42, 7, 1, 1) == derive_seed(42, 7, 1, 1) < 2 ** 62


def test_masks_and_samples_differ_across_ranks():
    """Each rank masks and samples with its own seeds: the same step and batch on ranks 0 and 1 get other masks."""
    from electra_ds.train.pretrain import masking_inputs

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 32), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kw = dict(vocab_size=100, special_ids={"pad": 0, "cls": 2, "sep": 3, "mask": 4}, mlm_probability=0.15,
              max_predictions=5, step=7, seed=42)
    (plan0, seed0), (again, seed_again), (plan1, seed1) = (masking_inputs(batch, rank=r, **kw) for r in (0, 0, 1))
    assert torch.equal(plan0.masked_positions, again.masked_positions) and int(seed0) == int(seed_again)
    assert int(seed0) != int(seed1)
    assert not torch.equal(plan0.masked_positions, plan1.masked_positions)
    assert int(seed1) == derive_seed(42, 7, 1, pretrain.SAMPLE_STREAM)


@pytest.mark.parametrize("size, probability, slots", [("tiny", 0.15, 19), ("small", 0.15, 19), ("base", 0.15, 79),
                                                      ("large", 0.25, 130)])
def test_recipes_mask_15_percent_and_large_25(size, probability, slots):
    """DESIGN.md: 15% of tokens masked; ELECTRA-Large masks 25%. Without --mlm_probability the plan uses the recipe."""
    from electra_ds.config import RECIPES

    assert RECIPES[size]["mlm_probability"] == probability
    plan = make_plan(parse_args(["--model_size", size, "--data", "x", "--deepspeed_config", "fp32"]), world_size=1)
    assert (plan.mlm_probability, plan.max_predictions) == (probability, slots)
    flagged = make_plan(parse_args(["--model_size", size, "--data", "x", "--deepspeed_config", "fp32",
                                    "--mlm_probability", "0.2"]), world_size=1)
    assert flagged.mlm_probability == 0.2


def test_inductor_settings_are_checked_before_any_compile(capsys):
    """--inductor KEY=VALUE (repeatable): torch._inductor.config settings, parsed and checked when the arguments
    are (a typo must not cost a compile), and only with --compile; applying them sets the process-wide config."""
    import torch._inductor.config as inductor_config

    base = ["--model_size", "tiny", "--data", "x", "--deepspeed_config", "fp32"]
    args = parse_args(base + ["--compile", "reduce-overhead", "--inductor", "combo_kernels=True", "--inductor",
                              "max_fusion_size = 32", "--inductor", "max_autotune_gemm_backends=ATEN,TRITON"])
    assert dict(args.inductor) == {"combo_kernels": True, "max_fusion_size": 32,
                                   "max_autotune_gemm_backends": "ATEN,TRITON"}
    make_plan(args, world_size=1)
    for bad, says in [("combo_kernels", "expected KEY=VALUE"), ("no_such_setting=1", "not a torch._inductor.config"),
                      ("max_fusion_size=big", "expected int, like its default 64"),
                      ("max_fusion_size=True", "expected int"), ("combo_kernels=1", "expected bool")]:
        with pytest.raises(SystemExit):
            parse_args(base + ["--compile", "default", "--inductor", bad])
        assert says in capsys.readouterr().err, bad
    with pytest.raises(SetupError, match="add --compile"):
        make_plan(parse_args(base + ["--inductor", "combo_kernels=True"]), world_size=1)
    with inductor_config.patch(combo_kernels=False, max_fusion_size=64,
                               max_autotune_gemm_backends=inductor_config.max_autotune_gemm_backends):
        pretrain.apply_inductor_settings(dict(args.inductor))
        assert inductor_config.combo_kernels is True and inductor_config.max_fusion_size == 32


def test_compile_options_put_our_defaults_between_the_mode_and_the_flags():
    """Our model compiles with torch.compile(options=...) (a mode and options cannot both be given): the mode's
    settings, then COMPILE_DEFAULTS (combo kernels), then --inductor's, which override both; torch.compile accepts
    the result for every --compile mode, and it compiles and runs here (a CPU compile ignores combo kernels)."""
    assert pretrain.COMPILE_DEFAULTS == {"combo_kernels": True}
    assert pretrain.compile_options(None) == pretrain.compile_options("default") == {"combo_kernels": True}
    assert pretrain.compile_options("reduce-overhead") == {"triton.cudagraphs": True, "combo_kernels": True}
    assert pretrain.compile_options("max-autotune", {"combo_kernels": False, "max_fusion_size": 32}) == {
        "max_autotune": True, "triton.cudagraphs": True, "coordinate_descent_tuning": True, "combo_kernels": False,
        "max_fusion_size": 32}
    for mode in ("default", "reduce-overhead", "max-autotune"):
        torch.compile(torch.sin, options=pretrain.compile_options(mode))
    x = torch.linspace(-2, 2, 7)
    torch.testing.assert_close(torch.compile(lambda t: torch.sin(t) * t, options=pretrain.compile_options(None))(x),
                               torch.sin(x) * x)


def test_rc2020_step_flags_count_samples_and_the_readme_command_parses():
    readme = ("--mlm_probability 0.15  --mlm_replacement_probability 0.85 --max_length 128 "
              "--per_device_train_batch_size 128 --gradient_accumulation_steps 1 --logging_steps 3840 "
              "--eval_steps 12800 --save_steps 1280000 --experiment_name pretraining_OWT --generator_layer_size 1.0 "
              "--generator_size 0.25").split()
    plan = make_plan(parse_args(readme), world_size=1)
    assert (plan.log_every, plan.eval_every, plan.save_every) == (30, 100, 10_000)
    assert plan.max_steps == 1_000_000 and plan.learning_rate == 5e-4 and plan.max_predictions == 19
    assert plan.output_dir == Path("runs/pretraining_OWT/small-gen0.25x1")
    assert make_plan(parse_args(readme[:-1] + ["0.5"]), 1).output_dir != plan.output_dir  # the sweep's runs differ


def test_training_curves_without_matplotlib_warn_instead_of_failing(tmp_path, monkeypatch, caplog):
    from electra_ds.train.plots import plot_training_curves

    records = [{"step": 1, "split": "train", "loss": 3.0}]
    assert plot_training_curves(records, tmp_path / "a.png") == tmp_path / "a.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a machine without it: the import fails
    with caplog.at_level(logging.WARNING):
        assert plot_training_curves(records, tmp_path / "b.png") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "b.png").exists()


def test_device_meter_sums_finite_losses_and_all_stats():
    from electra_ds.train.metrics_log import DeviceMeter

    meter = DeviceMeter(torch.device("cpu"))
    for loss, stats in ((2.0, torch.arange(7.0)), (float("nan"), torch.ones(7))):
        meter.add(SimpleNamespace(loss=torch.tensor(loss), mlm_loss=torch.tensor(1.0), disc_loss=torch.tensor(0.5),
                                  stats=stats))
    assert meter.sums.tolist() == [2.0, 1.0, 0.5, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert meter.micro_batches == 2


def test_replica_check_ignores_rounding_noise_and_flags_real_gaps():
    weights = [torch.randn(300, 7), torch.randn(50)]
    engine = SimpleNamespace(module=torch.nn.ParameterList(weights), device=torch.device("cpu"))
    one_rank = pretrain.weight_stats(engine)
    assert one_rank.shape == (1, 2, 3) and not one_rank[..., 0].any()
    assert one_rank[0, 1, 2].item() == pytest.approx(weights[1].abs().sum().item())
    ranks = one_rank.repeat(3, 1, 1)
    ranks[1, 0, 1] += 1e-9 * ranks[0, 0, 2]  # a last-bit difference in the reduction order
    ranks[2, 1, 2] += 1e-4 * ranks[0, 1, 2]  # one tensor moved on its own
    assert pretrain.differing_ranks(ranks) == [2]
    assert pretrain.replica_gaps(ranks)[0] == 0 and pretrain.replica_gaps(ranks)[2] == pytest.approx(1e-4)


def test_collapse_monitor_warns_after_warmup_only(caplog):
    monitor = CollapseMonitor(warmup_steps=10, window=3, min_steps=5)
    collapsed = {"disc_acc_replaced": 0.01, "disc_acc_original": 0.999}
    assert not any(monitor.update(step, collapsed) for step in (5, 10))
    assert not monitor.update(11, collapsed) and not monitor.update(12, {"disc_acc_replaced": 0.3})
    with caplog.at_level(logging.WARNING):
        results = [monitor.update(step, collapsed) for step in (13, 14, 15)]
    assert results == [False, False, True]
    assert "collapse" in caplog.text
    assert CollapseMonitor(warmup_steps=30).start_step == 1000  # a short run's early all-original phase is normal


def test_engine_step_equals_a_hand_written_step(corpus):
    """DeepSpeed (fp32, ZeRO 0) applies exactly: loss.backward, clip to norm 1, ElectraAdam with wd 0.01 on the
    decay group only, at the schedule's learning rate."""
    import copy

    from electra_ds.config import preset
    from electra_ds.data.cache import TokenCache
    from electra_ds.data.sampler import SegmentSampler
    from electra_ds.model import ElectraForPretraining
    from electra_ds.train.pretrain import forward, pretraining_step

    ds_engine.setup_distributed()
    cache = TokenCache(corpus)
    config = preset("tiny", vocab_size=cache.vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = ElectraForPretraining(config)
    manual = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    engine = ds_engine.initialize(model, load_ds_config("fp32", micro_batch_size=4, gradient_accumulation_steps=1,
                                                        world_size=1),
                                  learning_rate=1e-2, warmup_steps=0, max_steps=4)
    batch = {k: torch.from_numpy(v) for k, v in SegmentSampler(cache, 32, 4, seed=0).batch(0).items()}
    kw = dict(special_ids=cache.special_ids, mlm_probability=0.15, max_predictions=5, step=0, seed=3)
    pretraining_step(engine, batch, **kw)

    class Bare:  # what forward() needs of an engine
        module, global_rank = manual, 0

        def __call__(self, *args):
            return manual(*args)

    opt = ElectraAdam(manual.param_groups(0.01), lr=1e-2, eps=1e-6)
    forward(Bare(), batch, rank=0, **kw).loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(manual.parameters(), 1.0)
    opt.step()
    assert norm > 1.0  # so the clipping (which the engine hands to ElectraAdam, on the device) mattered
    assert grad_norm(engine) == pytest.approx(float(norm), rel=1e-5)
    for (name, a), b, start in zip(engine.module.named_parameters(), manual.parameters(), initial):
        assert (a.detach() - start).abs().max() > 1e-3, f"{name} did not move"
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert engine.get_lr()[0] == pytest.approx(1e-2 * 0.75)  # the schedule stepped once: (1 - 1/4)


def test_evaluation_leaves_the_training_rng_as_it_was(corpus, monkeypatch):
    """evaluate() runs in a forked RNG: whatever it draws from the global generator (here one draw per batch, as
    dropout left on or a DataLoader would) leaves the training's dropout noise where it was."""
    from electra_ds.config import preset
    from electra_ds.data.sampler import SegmentSampler
    from electra_ds.model import ElectraForPretraining
    from electra_ds.train.pretrain import evaluate

    cache = TokenCache(corpus)
    model = ElectraForPretraining(preset("tiny", vocab_size=cache.vocab_size))

    class Bare:  # what evaluate() needs of an engine
        module, global_rank, world_size, device = model, 0, 1, torch.device("cpu")
        eval, train = model.eval, model.train

        def __call__(self, *args):
            return model(*args)

    forward_once = pretrain.forward
    draws = []

    def drawing_forward(*args, **kwargs):
        draws.append(torch.rand(()))
        return forward_once(*args, **kwargs)

    monkeypatch.setattr(pretrain, "forward", drawing_forward)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    values = evaluate(Bare(), SegmentSampler(cache, 32, 4, seed=1), batches=2, special_ids=cache.special_ids,
                      mlm_probability=0.15, max_predictions=5, seed=3, mask_replace_prob=0.85)
    assert len(draws) == 2 and np.isfinite(values["loss"]) and model.training
    assert torch.equal(torch.get_rng_state(), before)


def test_dropout_is_seeded_per_rank(corpus, tmp_path, monkeypatch):
    """After building the model (same weights everywhere) each rank seeds the global RNG with its own seed,
    derive_seed(seed, 0, rank, DROPOUT_STREAM), for whatever draws from it (the model's dropout masks derive from the
    step's noise seed instead, which differs per rank too). Run here as rank 1 up to that point."""
    from electra_ds.seeding import DROPOUT_STREAM

    class Seeded(Exception):
        pass

    seeds = []

    def recording_seed_everything(seed):
        seeds.append(seed)
        if len(seeds) == 2:
            raise Seeded

    setup = ds_engine.setup_distributed
    monkeypatch.setattr(ds_engine, "setup_distributed", lambda *a, **kw: (1, *setup(*a, **kw)[1:]))
    monkeypatch.setattr(pretrain, "prepare_cache", lambda args, rank: Path(args.data))
    monkeypatch.setattr(pretrain, "seed_everything", recording_seed_everything)
    with pytest.raises(Seeded):
        train(corpus, tmp_path / "out", steps=1)
    assert seeds == [42, derive_seed(42, 0, 1, DROPOUT_STREAM)]
    assert derive_seed(42, 0, 1, DROPOUT_STREAM) != derive_seed(42, 0, 0, DROPOUT_STREAM)


# -- bad input: a clear error before any engine is built ------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--max_length", "256"], "longer than the model's 128 positions"),
    (["--deepspeed_config", "no_such_config"], "not a shipped config name"),
    (["--model_override", "vocab_size=20"], "smaller than the vocabulary of the cache"),
    (["--model_override", "hiden_size=3"], "unknown ElectraConfig field"),
    (["--logging_steps", "0"], "--logging_steps must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--num_workers", "-1"], "--num_workers must be >= 0"),
    (["--two_segments", "--max_length", "3"], r"--max_length must be >= 4 \(\[CLS\] text \[SEP\] text"),
])
def test_bad_flags_fail_clearly(corpus, tmp_path, extra, message):
    with pytest.raises(SetupError, match=message):
        run(parse_args(argv(corpus, tmp_path / "out") + extra))


def test_batch_sizes_that_disagree_fail_clearly(corpus, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 6, "gradient_clipping": 1.0}))
    with pytest.raises(SetupError, match="train_batch_size is 6 but the command line gives 4"):
        run(parse_args(argv(corpus, tmp_path / "out") + ["--deepspeed_config", str(path)]))
    args = parse_args(["--model_size", "tiny", "--data", str(corpus)])
    with pytest.raises(SetupError, match="does not divide over 3 processes"):
        make_plan(args, world_size=3)


def test_half_precision_the_machine_lacks_fails_clearly(corpus, tmp_path, monkeypatch):
    """DeepSpeed's CPU accelerator offers fp16 only where oneDNN supports it (not on every x86 CPU): a config asking
    for it there fails at planning with the alternatives, not inside deepspeed.initialize."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "supported_dtypes", lambda self: [torch.float32, torch.bfloat16])
    with pytest.raises(SetupError, match="fp16 weights are not supported .* use .* bf16.json or fp32.json"):
        run(parse_args(argv(corpus, tmp_path / "out") + ["--deepspeed_config", "fp16"]))
    with pytest.raises(SetupError, match="fp16 weights"):
        make_plan(parse_args(argv(corpus, tmp_path / "out") + ["--deepspeed_config", "fp16"]), world_size=1)
    make_plan(parse_args(argv(corpus, tmp_path / "out") + ["--deepspeed_config", "bf16"]), world_size=1)


def _fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return torch.float16 in get_accelerator().supported_dtypes()


def test_missing_data_fails_clearly(tmp_path):
    with pytest.raises(SetupError, match="--data '.*no_such_cache'"):
        run(parse_args(argv(tmp_path / "no_such_cache", tmp_path / "out")))


def test_source_flags_reach_the_cache(tmp_path):
    """pretrain.py reads a source as build_cache.py does: record field, Gutenberg stripping, document split."""
    import gzip

    book = "Header\n*** START OF THE BOOK ***\nthe tale begins here\n*** END OF THE BOOK ***\nlicence text\n"
    with gzip.open(tmp_path / "books.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": book, "text": "the wrong field"}) + "\n")
    args = parse_args(["--data", str(tmp_path / "books.jsonl.gz"), "--cache_root", str(tmp_path / "caches"),
                       "--vocab_size_to_train", "200", "--text_field", "body", "--strip_gutenberg"])
    path = prepare_cache(args, rank=0)
    cache = TokenCache(path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["settings"]["strip_gutenberg"] and manifest["settings"]["text_field"] == "body"
    from electra_ds.data.tokenizer import load_tokenizer

    text = load_tokenizer(cache.tokenizer_path).decode(cache.document(0).tolist())
    assert text == "the tale begins here"


# -- the real engine --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ds_config", ["fp32", "bf16", "bf16_zero2", "bf16_zero3"])
def test_engine_trains_each_precision_and_zero_stage(corpus, tmp_path, ds_config):
    out = tmp_path / "out"
    records = train(corpus, out, "--deepspeed_config", ds_config, *(["--export_hf"] if "bf16" in ds_config else []),
                    steps=4)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    for r in train_records:
        assert np.isfinite(r["loss"]) and 0 <= r["gen_acc"] <= 1 and 0 < r["replaced_frac"] < 0.2
        assert r["tokens_per_s"] > 0 and r["pfs_days"] > 0
    assert [r["step"] for r in records if r["split"] == "eval"] == [4]
    assert (out / "checkpoints" / "step00000004" / MANIFEST).is_file()
    if "bf16" in ds_config:  # the export holds the fp32 master weights, not bf16-rounded copies
        from electra_ds.model import load_pretrained

        weights = torch.cat([p.detach().flatten() for p in load_pretrained(out).parameters()])
        assert (weights != weights.bfloat16().float()).float().mean() > 0.5


@pytest.mark.parametrize("ds_config", ["bf16_zero2", "bf16_zero3"])
def test_zero_resume_from_a_checkpoint_repeats_the_run(corpus, tmp_path, ds_config):
    reference = losses(train(corpus, tmp_path / "reference", "--deepspeed_config", ds_config, "--save_steps", "8",
                             steps=4))  # checkpoints at steps 2 and 4
    checkpoint = tmp_path / "reference" / "checkpoints" / "step00000002"
    resumed = losses(train(corpus, tmp_path / "resumed", "--deepspeed_config", ds_config, "--resume",
                           str(checkpoint), steps=4))
    assert resumed == {3: reference[3], 4: reference[4]}


def test_resume_with_gradient_accumulation_repeats_the_run(corpus, tmp_path):
    """The data position counts micro-batches: a resume at step 2 of 2 micro-batches a step continues at the 5th."""
    accumulate = ("--gradient_accumulation_steps", "2", "--save_steps", "16")  # global batch 8: saves every 2 steps
    reference = losses(train(corpus, tmp_path / "reference", *accumulate, steps=4))
    checkpoint = tmp_path / "reference" / "checkpoints" / "step00000002"
    resumed = losses(train(corpus, tmp_path / "resumed", *accumulate, "--resume", str(checkpoint), steps=4))
    assert resumed == {3: reference[3], 4: reference[4]}


def test_sample_layout_flags_reach_both_samplers(corpus, tmp_path, monkeypatch):
    from electra_ds.data import sampler as sampler_module

    made = []

    class Recording(sampler_module.SegmentSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((self.pack, self.two_segments))

    monkeypatch.setattr(sampler_module, "SegmentSampler", Recording)
    records = train(corpus, tmp_path / "out", "--two_segments", "--pack_documents", steps=2)
    assert made == [(True, True), (True, True)]  # training and held-out
    assert all(np.isfinite(r["loss"]) for r in records)


def test_run_config_names_the_cache_by_an_absolute_path(corpus, tmp_path, monkeypatch):
    """Fine-tuning finds the tokenizer through run_config.json from any working directory."""
    monkeypatch.chdir(tmp_path)
    train(Path(os.path.relpath(corpus, tmp_path)), Path("out"), steps=1)
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["data"] == str(corpus.resolve())


def test_loss_goes_down_and_outputs_are_written(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    records = train(corpus, out, "--learning_rate", "2e-3", "--export_hf", steps=60, batch=8)
    capsys.readouterr()
    train(corpus, out, "--learning_rate", "2e-3", "--export_hf", steps=60, batch=8)  # finished: resumes, returns
    summary = capsys.readouterr().out  # from metrics.jsonl, not from this (stepless) process
    assert f"final train: loss {records[-2]['loss']:.4f}" in summary and "final eval:  loss n/a" not in summary
    curve = [r["loss"] for r in records if r["split"] == "train"]
    # medians: at this learning rate the discriminator's loss spikes now and then for a step (data-dependent)
    assert np.median(curve[-10:]) < 0.8 * np.median(curve[:5]), curve
    last = records[-2]
    assert {"loss", "mlm_loss", "disc_loss", "gen_acc", "disc_acc_replaced", "disc_acc_original", "replaced_frac",
            "lr", "grad_norm", "loss_scale", "tokens_per_s", "elapsed_s", "flops", "pfs_days"} <= set(last)
    assert (out / "training_curves.png").stat().st_size > 10_000
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["vocab_size"] == TokenCache(corpus).vocab_size and config["tokenizer_hash"]
    # the HF pair holds the trained weights and the tokenizer
    from electra_ds.model import load_pretrained

    model = load_pretrained(out)
    assert model.config.vocab_size == TokenCache(corpus).vocab_size
    assert (out / "hf" / "discriminator" / "tokenizer.json").is_file()
    assert (out / "hf" / "generator" / "config.json").is_file()


def test_discriminator_learns_to_spot_random_replacements(corpus, tmp_path):
    """With a very hot generator (temperature 100) replacements are near-uniform random tokens, which a working
    discriminator path learns to flag within a few dozen steps (a plausible generator's samples take far longer)."""
    records = train(corpus, tmp_path / "out", "--learning_rate", "1e-3", "--warmup_steps", "30", "--max_length", "64",
                    "--model_override", "temperature=100", steps=100, batch=32)
    train_records = [r for r in records if r["split"] == "train"]
    late = train_records[-3:]
    assert np.mean([r["disc_acc_replaced"] for r in late]) > 0.1, [r["disc_acc_replaced"] for r in train_records]
    assert np.mean([r["disc_acc_original"] for r in late]) > 0.8
    # below the entropy of the replaced fraction: what a discriminator that learned nothing but the rate gets
    p = np.mean([r["replaced_frac"] for r in late])
    assert np.mean([r["disc_loss"] for r in late]) < 0.95 * -(p * np.log(p) + (1 - p) * np.log(1 - p))


@pytest.fixture(scope="module")
def one_document_corpus(corpus, tmp_path_factory) -> Path:
    """`corpus`'s text as one document: every sequence fills --max_length, so no batch is padded."""
    from electra_ds.data.cache import ensure_cache

    root = tmp_path_factory.mktemp("one_document")
    return ensure_cache(str(corpus.parent.parent / "text.txt"), root, vocab_size=1000, doc_split="file", workers=1,
                        progress=False)


@pytest.mark.slow
def test_compile_changes_speed_only(one_document_corpus, tmp_path):
    """--compile runs inductor over the PyTorch twins (and the generator head's loss and sampling as one opaque op):
    the same losses as eager, dropout on (hidden states and attention probabilities: the same hashed masks). Mostly
    compiling, so on a corpus whose batches are never padded (one graph; padded batches would compile another) and
    without evaluation (another compile of the forward). With an empty inductor cache on 2 CPU cores this test took
    313 s, and 649 s on `corpus` (the real text's paragraphs, tests/conftest.py), whose batches with padding and
    without compiled apart, on a machine that ran the whole suite in 1832 s."""
    eager = losses(train(one_document_corpus, tmp_path / "eager", "--eval_batches", "0", steps=3))
    torch._dynamo.utils.counters.clear()
    compiled = losses(train(one_document_corpus, tmp_path / "compiled", "--compile", "default", "--eval_batches", "0",
                            steps=3))
    # one graph per forward (and its backward): a graph break would split the CUDA graphs of reduce-overhead
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert eager.keys() == compiled.keys()
    np.testing.assert_allclose([compiled[k] for k in eager], list(eager.values()), rtol=1e-4)


@pytest.mark.skipif(not _fp16_supported(), reason="DeepSpeed's accelerator here has no fp16 (a CPU without oneDNN "
                    "fp16 support)")
def test_fp16_overflow_skips_steps_and_keeps_weights_finite(corpus, tmp_path):
    """A loss scale of 2^40 overflows fp16 gradients: DeepSpeed's scaler must skip those steps and lower the
    scale, and training then proceeds with finite weights (fp16 runs on the CPU accelerator)."""
    config = json.loads((ds_engine.DS_CONFIG_DIR / "fp16.json").read_text())
    config["fp16"].update(initial_scale_power=40, hysteresis=1)
    path = tmp_path / "fp16_huge_scale.json"
    path.write_text(json.dumps(config))
    records = train(corpus, tmp_path / "out", "--deepspeed_config", str(path), steps=30)
    train_records = [r for r in records if r["split"] == "train"]
    assert train_records[-1]["skipped_steps"] >= 20  # 2^40 -> below ~2^16 takes over 20 halvings
    assert train_records[-1]["loss_scale"] < 2 ** 20
    assert np.isfinite(train_records[-1]["loss"])
    state = torch.load(next((tmp_path / "out" / "checkpoints").glob("step*/mp_rank_00_model_states.pt")),
                       map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["module"].values())


# -- checkpoints and resume -------------------------------------------------------------------------------------


# The SIGKILL tests' run: 15 steps, a checkpoint every 3 (keep 3). `python -c KILLED_AT POINT ARGS...` runs it and
# SIGKILLs itself at POINT, so where the kill lands does not depend on timing. (Killing it from outside once step 6's
# checkpoint appeared failed on a loaded machine: that checkpoint exists for under a second before pruning deletes
# it, so a poller held back that long missed it and the run ended unkilled; and the start-up alone can outlast a
# deadline.)
SIGKILL_RUN = dict(extra=("--save_steps", "12"), steps=15)
KILLED_AT = """
import os, shutil, signal, sys
from pathlib import Path
from electra_ds.train import checkpoint, pretrain

point, args = sys.argv[1], sys.argv[2:]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def before(module, name, hit):
    original = getattr(module, name)

    def wrapped(*a, **kw):
        if hit(*a, **kw):
            die()
        return original(*a, **kw)

    setattr(module, name, wrapped)


if point == "training":
    before(pretrain, "pretraining_step", lambda engine, batch, *, step, **kw: step == 7)
elif point == "saving":
    before(checkpoint, "atomic_write", lambda path, data: Path(path).parent.name == "step00000009.partial")
elif point == "renaming":
    before(checkpoint, "move_into_place", lambda src, dst, aside: Path(dst).name == "step00000009")
elif point == "pointing":  # the new `latest` written to its temporary name, not yet renamed
    before(os, "replace", lambda src, dst: Path(dst).name == "latest" and Path(src).read_text() == "step00000009")
elif point == "pruning":
    def half_removed(path, *a, **kw):
        if Path(path).name == "step00000003":
            (Path(path) / "mp_rank_00_model_states.pt").unlink()
            return True
        return False

    before(shutil, "rmtree", half_removed)
else:
    raise SystemExit(f"unknown kill point {point}")
sys.exit(pretrain.main(args))
"""
# Where the run kills itself: (the complete checkpoints it leaves, the step a resume continues from).
KILL_POINTS = {
    "training": ([6, 3], 6),  # during step 8, between two saves
    "saving": ([6, 3], 6),  # step 9's files written under step00000009.partial, not yet its manifest
    "renaming": ([6, 3], 9),  # step 9 complete under its .partial name, not yet renamed: the resume finishes it
    "pointing": ([9, 6, 3], 9),  # step 9 in place, DeepSpeed's `latest` still names step 6, its successor a temp
    "pruning": ([12, 9, 6, 3], 12),  # step 12's save pruning step 3: its model file gone, its manifest left
}


@pytest.fixture(scope="module")
def sigkill_reference(corpus, tmp_path_factory) -> dict[int, float]:
    """The losses of the SIGKILL tests' run uninterrupted."""
    with saved_environ():
        return losses(train(corpus, tmp_path_factory.mktemp("sigkill") / "reference", *SIGKILL_RUN["extra"],
                            steps=SIGKILL_RUN["steps"]))


@pytest.mark.parametrize("point", KILL_POINTS)
def test_resume_after_sigkill_repeats_the_uninterrupted_run(corpus, tmp_path, sigkill_reference, point, caplog):
    steps, (left, resume_step) = SIGKILL_RUN["steps"], KILL_POINTS[point]
    out = tmp_path / "killed"
    proc = start(corpus, out, *SIGKILL_RUN["extra"], steps=steps, kill_at=point)
    try:
        proc.wait(timeout=600)  # minutes only on a heavily loaded machine
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run did not reach its kill point in 600 s:\n{output_of(proc)}") from None
    assert proc.returncode == -signal.SIGKILL, output_of(proc)
    checkpoints = CheckpointManager(out / "checkpoints", 3, 0, 1)
    assert [s for s, _ in checkpoints.complete()] == left  # the kill landed where it was meant to
    if point == "pruning":
        assert [s for s, _ in checkpoints.sound()] == [12, 9, 6]
    with caplog.at_level(logging.INFO, logger="electra_ds"):
        resumed = losses(train(corpus, out, *SIGKILL_RUN["extra"], steps=steps))
    assert f"resumed from step {resume_step} " in caplog.text
    assert sorted(resumed) == list(range(1, steps + 1))
    np.testing.assert_allclose([resumed[s] for s in range(1, steps + 1)],
                               [sigkill_reference[s] for s in range(1, steps + 1)], rtol=1e-6, atol=0)
    assert [s for s, _ in checkpoints.complete()] == [15, 12, 9]  # keep-last-K pruning, the damaged one included
    assert not list(checkpoints.root.glob(f"*{PARTIAL}")) and not list(checkpoints.root.glob(".*"))


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    """SIGTERM to the process group (a launcher or a cluster signals every process), data loader workers included:
    they take it only from the training process, which saves with them and then ends them."""
    out = tmp_path / "out"
    proc = start(corpus, out, "--num_workers", "1", steps=2000, start_new_session=True)
    wait_for(lambda: len(MetricsFile(out / "metrics.jsonl").records()) >= 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    output = output_of(proc)
    assert proc.returncode == 0, output
    assert "SIGTERM received" in output
    complete = CheckpointManager(out / "checkpoints", 3, 0, 1).complete()
    assert complete and 2 <= complete[0][0] < 2000


def test_a_launcher_passing_on_ctrl_c_is_one_stop_request():
    """The terminal sends SIGINT to every rank and a launcher passes it on (deepspeed: as SIGTERM) at once: that is
    one request to save and stop; a second signal later is an impatient user."""
    with pretrain.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGINT"
        stop._first_at -= pretrain.SAME_REQUEST_S
        with pytest.raises(KeyboardInterrupt, match="second SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_stop_between_logging_steps_resumes_to_the_same_records(corpus, tmp_path, monkeypatch):
    """The checkpoint keeps the logging interval's sums, so the record after a resume covers the whole interval."""
    every_5 = ("--logging_steps", "20")  # 20 samples = 5 steps of 4
    reference = train(corpus, tmp_path / "reference", *every_5, steps=10)
    step_once = pretrain.pretraining_step

    def stop_during_step_7(engine, batch, *, step, **kw):
        if step == 6:  # the 7th step's micro-batch: the run finishes it, saves step 7 and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return step_once(engine, batch, step=step, **kw)

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "pretraining_step", stop_during_step_7)
        train(corpus, out, *every_5, steps=10)
    assert [s for s, _ in CheckpointManager(out / "checkpoints", 3, 0, 1).complete()] == [7]
    resumed = train(corpus, out, *every_5, steps=10)
    timing = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in reference]


def test_tokens_per_s_leaves_out_the_startup_steps(corpus, tmp_path, monkeypatch):
    """Compilation and CUDA-graph capture make a process's first steps slow; the logged rate must not average them
    in. Here the first step takes an extra 2 s: counted, the first record would show a fraction of the second's rate."""
    step_once = pretrain.pretraining_step

    def slow_first_step(engine, batch, *, step, **kw):
        if step == 0:
            time.sleep(2.0)
        return step_once(engine, batch, step=step, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "pretraining_step", slow_first_step)
        records = train(corpus, tmp_path / "out", "--logging_steps", "24", steps=12)  # records at steps 6 and 12
    first, second = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    assert first > 0.5 * second, (first, second)

    # Records within the start-up steps (slow, but plain rates), and a resume off the logging grid: no window is
    # left with start-up time taken out twice or steps it did not hold (that gave 0, negative or huge rates).
    def rates(records: list[dict], after: int = 0) -> list[float]:
        return [r["tokens_per_s"] for r in records if r["split"] == "train" and r["step"] > after]

    every_2 = rates(train(corpus, tmp_path / "every_2", "--logging_steps", "8", steps=8))
    out = tmp_path / "resumed"
    train(corpus, out, "--logging_steps", "12", steps=5)  # records at 3 and 5, saved at 5
    every_3 = rates(train(corpus, out, "--logging_steps", "12", steps=12), after=5)  # records at 6, 9 and 12
    median = np.median(every_2 + every_3)
    assert len(every_2) == 4 and len(every_3) == 3 and all(0 < r < 5 * median for r in every_2 + every_3), \
        (every_2, every_3)


def test_a_checkpoint_within_the_startup_steps_leaves_them_out_of_the_resumed_rate(corpus, tmp_path, monkeypatch):
    """A run stopped during its start-up steps (a preemption soon after a restart) saves its logging window: the first
    record after the resume must not average in the stopped run's slow start-up."""
    step_once = pretrain.pretraining_step

    def slow_first_step_then_stop(engine, batch, *, step, **kw):
        if step == 0:
            time.sleep(2.0)
            os.kill(os.getpid(), signal.SIGTERM)  # finishes step 1, saves it and stops
        return step_once(engine, batch, step=step, **kw)

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "pretraining_step", slow_first_step_then_stop)
        train(corpus, out, "--logging_steps", "24", steps=12)
    assert [s for s, _ in CheckpointManager(out / "checkpoints", 3, 0, 1).complete()] == [1]
    records = train(corpus, out, "--logging_steps", "24", steps=12)  # records at steps 6 and 12
    first, second = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    assert first > 0.5 * second, (first, second)


def test_resume_warns_of_another_world_size_or_an_edited_ds_config(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    train(corpus, out, steps=1)
    path = out / "run_config.json"
    recorded = json.loads(path.read_text())
    recorded["world_size"] = 2
    recorded["ds_config"]["gradient_clipping"] = 5.0
    path.write_text(json.dumps(recorded))
    with caplog.at_level(logging.WARNING):
        train(corpus, out, steps=2)
    assert "with a changed DeepSpeed config (keys gradient_clipping)" in caplog.text
    assert "on 1 process(es), the checkpoint's run had 2" in caplog.text


def test_resume_from_a_run_with_another_tokenizer_is_refused(corpus, tmp_path):
    other = tmp_path / "other"
    train(corpus, other, steps=1)
    recorded = json.loads((other / "run_config.json").read_text())
    (other / "run_config.json").write_text(json.dumps({**recorded, "tokenizer_hash": "0123abcd"}))
    with pytest.raises(SetupError, match=r"used tokenizer 0123abcd, this run's data .*would mean other words"):
        train(corpus, tmp_path / "new", "--resume", str(other / "checkpoints" / "step00000001"), steps=2)


def test_resume_with_another_optimizer_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    train(corpus, out, steps=1)
    with pytest.raises(SetupError, match=r"--optimizer: the checkpoint has electra_adam, this run adamw"):
        train(corpus, out, "--optimizer", "adamw", steps=2)


@pytest.mark.parametrize("error, shown", [(OSError(28, "No space left on device"), "No space left on device"),
                                          (OSError(110, "Connection timed out"), "Connection timed out"),  # NFS
                                          (OSError(), ""),
                                          (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                        "704 vs 598"), "unexpected pos"),  # torch.save, disk full
                                          (RuntimeError("DataLoader worker (pid 7) is killed by signal: Terminated."),
                                           None)])  # not the disk: raised as it is
def test_a_checkpoint_that_cannot_be_written_stops_the_run_clearly(corpus, tmp_path, monkeypatch, error, shown):
    def failing_save(self, engine, step, client_state):
        raise error

    monkeypatch.setattr(CheckpointManager, "save", failing_save)
    if shown is None:
        with pytest.raises(type(error)) as raised:
            train(corpus, tmp_path / "out", steps=2)
        assert raised.value is error
        return
    with pytest.raises(pretrain.SaveError, match=r"could not write the checkpoint of step 2 under .*checkpoints "
                                                 rf"\(.* GB free there\): \w+Error: .*{shown}.*resume"):
        train(corpus, tmp_path / "out", steps=2)


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(corpus, tmp_path, caplog):
    out = tmp_path / "out"
    train(corpus, out, "--save_steps", "8", steps=6)  # checkpoints at steps 2, 4, 6
    model_file = out / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING):
        resumed = losses(train(corpus, out, "--save_steps", "8", steps=8))
    assert "step00000006 is unusable" in caplog.text and "truncated" in caplog.text
    assert sorted(resumed) == list(range(1, 9))
    assert json.loads((out / "checkpoints" / "step00000008" / MANIFEST).read_text())["step"] == 8
    checkpoints = CheckpointManager(out / "checkpoints", 3, 0, 1)
    assert checkpoints.problem("step00000006") is None  # saved again when the resumed run reached it
    assert [t for _, t in checkpoints.sound()] == ["step00000008", "step00000006", "step00000004"]
    assert (out / "checkpoints" / "step00000006.damaged" / model_file.name).stat().st_size == 1000  # kept aside


class FakeWandb:
    """Records which wandb run each training process logs to."""
    runs: list[tuple[str | None, dict]] = []

    def __init__(self, mode, out_dir, project, name, config, resume_id) -> None:
        self.id = resume_id or f"run{len(self.runs)}"
        self.runs.append((resume_id, config))

    def log(self, record) -> None:
        pass

    def finish(self) -> None:
        pass


def test_a_checkpoint_that_does_not_load_is_set_aside_as_damaged(corpus, tmp_path, caplog):
    """Sizes as recorded but the content garbled: it fails to load, and is set aside as damaged, not superseded."""
    out = tmp_path / "out"
    train(corpus, out, "--save_steps", "8", steps=4)  # checkpoints at steps 2 and 4
    model_file = out / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    with model_file.open("r+b") as f:
        f.write(b"\0" * 100)
    with caplog.at_level(logging.WARNING):
        train(corpus, out, "--save_steps", "8", steps=5)
    assert "step00000004 is unusable" in caplog.text
    assert (out / "checkpoints" / "step00000004.damaged").is_dir()
    assert not (out / "checkpoints" / "step00000004.superseded").exists()


def test_resume_from_another_output_dir_logs_to_a_new_wandb_run(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrain, "Wandb", FakeWandb)
    monkeypatch.setattr(FakeWandb, "runs", [])
    train(corpus, tmp_path / "a", steps=2)
    theirs = tmp_path / "a" / "checkpoints"
    shutil.copytree(theirs / "step00000002", theirs / f"step00000004{PARTIAL}")  # as if killed while moving it
    listing = sorted(p.name for p in theirs.iterdir())
    train(corpus, tmp_path / "b", "--resume", str(theirs / "step00000002"), steps=3)
    assert sorted(p.name for p in theirs.iterdir()) == listing  # read, not changed (a resume there would finish it)
    assert [resume_id for resume_id, _ in FakeWandb.runs] == [None, None]
    assert FakeWandb.runs[1][1]["resumed_from_wandb_run"] == "run0"


def test_resume_from_an_older_checkpoint_sets_the_later_ones_aside(corpus, tmp_path, monkeypatch):
    """After --resume <older checkpoint> in the same output_dir, a plain resume continues the new run, not the
    abandoned one. wandb keeps one run while no logged step is replayed, and starts a new one when steps are."""
    monkeypatch.setattr(pretrain, "Wandb", FakeWandb)
    monkeypatch.setattr(FakeWandb, "runs", [])
    out = tmp_path / "out"
    train(corpus, out, "--save_steps", "8", steps=4)  # checkpoints at steps 2 and 4
    train(corpus, out, "--save_steps", "8", steps=5)  # continues after step 4: the same wandb run
    train(corpus, out, "--resume", str(out / "checkpoints" / "step00000002"), steps=3)
    checkpoints = CheckpointManager(out / "checkpoints", 3, 0, 1)
    assert [t for _, t in checkpoints.complete()] == ["step00000003", "step00000002"]
    assert checkpoints.problem("step00000004.superseded") is None
    assert (out / "checkpoints" / "latest").read_text() == "step00000003"  # DeepSpeed's pointer: an existing tag
    assert [resume_id for resume_id, _ in FakeWandb.runs] == [None, "run0", None]
    assert FakeWandb.runs[2][1]["resumed_from_wandb_run"] == "run0"


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine: one file holding `weights`."""

    def __init__(self, weights: str) -> None:
        self.weights = weights

    def save_checkpoint(self, root, tag, client_state, save_latest=True):
        (Path(root) / tag / "model.pt").write_text(self.weights)

    def load_checkpoint(self, root, tag, **kw):
        return root, {}


def test_checkpoint_saves_replace_what_this_process_did_not_write(tmp_path):
    root = tmp_path / "checkpoints"
    first = CheckpointManager(root, keep=3, rank=0, world_size=1)
    first.save(FakeEngine("old"), 2, {})
    first.save(FakeEngine("changed"), 2, {})  # already saved by this process: kept
    assert (root / "step00000002" / "model.pt").read_text() == "old"
    CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("new"), 2, {})  # another process
    assert (root / "step00000002" / "model.pt").read_text() == "new"
    assert CheckpointManager(root, 3, 0, 1).problem("step00000002") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000002"]


def test_a_save_killed_while_moving_into_place_is_finished_on_restore(tmp_path):
    root = tmp_path / "checkpoints"
    CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("old"), 4, {})
    CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("new"), 4, {})
    os.replace(root / "step00000004", root / "step00000004.partial")  # killed between save()'s two renames:
    (root / ".step00000002.replaced").mkdir()  # the new one still under .partial, the old one moved away
    resumed = CheckpointManager(root, keep=3, rank=0, world_size=1)
    assert resumed.restore(FakeEngine(""))[0] == 4
    assert (root / "step00000004" / "model.pt").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000004"]


def test_restoring_from_another_runs_checkpoints_changes_nothing_there(tmp_path):
    """`--resume` naming another run's checkpoint reads that run's folder read-only: its save killed while moving
    into place stays for that run to finish (the same layout as the test above; here the folder could be shared)."""
    root = tmp_path / "theirs" / "checkpoints"
    CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("older"), 2, {})
    CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("new"), 4, {})
    os.replace(root / "step00000004", root / "step00000004.partial")
    before = sorted(p.name for p in root.iterdir())
    theirs = CheckpointManager(root, keep=3, rank=0, world_size=1, read_only=True)
    with pytest.raises(CheckpointError, match="killed while being moved into place"):
        theirs.restore(FakeEngine(""), "step00000004")
    assert theirs.restore(FakeEngine(""))[0] == 2
    for write in (lambda: theirs.save(FakeEngine("mine"), 6, {}), theirs.prune, lambda: theirs.set_aside(2)):
        with pytest.raises(CheckpointError, match="not written to"):
            write()
    assert sorted(p.name for p in root.iterdir()) == before


def test_pruning_never_keeps_a_damaged_checkpoint_instead_of_a_sound_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        CheckpointManager(root, keep=2, rank=0, world_size=1).save(FakeEngine("weights"), step, {})
    (root / "step00000020" / "model.pt").write_text("x")  # truncated
    resumed = CheckpointManager(root, keep=1, rank=0, world_size=1)
    assert resumed.restore(FakeEngine(""))[0] == 10
    resumed.save(FakeEngine("weights"), 15, {})
    assert [t for _, t in resumed.sound()] == ["step00000015"]
    assert resumed.set_aside(10) == [root / "step00000020.damaged"]  # what a resumed run does first
    assert [t for _, t in resumed.tags()] == ["step00000015"]
    assert (root / "latest").read_text() == "step00000015"


def test_set_aside_points_latest_at_a_checkpoint_that_exists(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        CheckpointManager(root, keep=3, rank=0, world_size=1).save(FakeEngine("w"), step, {})
    older = CheckpointManager(root, keep=3, rank=0, world_size=1)  # --resume to the older one
    assert older.restore(FakeEngine(""), "step00000002")[0] == 2
    assert older.set_aside(2) == [root / "step00000004.superseded"]
    assert (root / "latest").read_text() == "step00000002"  # DeepSpeed's pointer (zero_to_fp32.py reads it)


def test_resume_settings_are_checked_and_old_manifests_load(tmp_path):
    root = tmp_path / "checkpoints"
    settings = {"zero_stage": 2, "precision": "bf16", "learning_rate": 5e-4, "weight_decay": 0.01}
    CheckpointManager(root, 3, 0, world_size=2, settings=settings).save(FakeEngine("w"), 4, {})
    assert CheckpointManager(root, 3, 0, 2, settings=settings).restore(FakeEngine(""))[0] == 4
    with pytest.raises(CheckpointError, match="world size: the checkpoint has 2, this run 1; ZeRO partitions"):
        CheckpointManager(root, 3, 0, 1, settings=settings).restore(FakeEngine(""))
    manifest = json.loads((root / "step00000004" / MANIFEST).read_text())
    for key in settings:  # a manifest written before the settings were recorded
        del manifest[key]
    (root / "step00000004" / MANIFEST).write_text(json.dumps(manifest))
    assert CheckpointManager(root, 3, 0, 1, settings=dict(settings, zero_stage=0)).restore(FakeEngine(""))[0] == 4
    fp32 = {"zero_stage": 0, "precision": "fp32", "learning_rate": 5e-4, "weight_decay": 0.01}
    CheckpointManager(root, 3, 0, 1, settings=fp32).save(FakeEngine("w"), 6, {})
    autocast = dict(fp32, precision="bf16 autocast")  # fp32 weights either way: the same state
    assert CheckpointManager(root, 3, 0, 1, settings=autocast).restore(FakeEngine(""))[0] == 6
    with pytest.raises(CheckpointError, match="precision: the checkpoint has fp32, this run bf16;"):
        CheckpointManager(root, 3, 0, 1, settings=dict(fp32, precision="bf16")).restore(FakeEngine(""))
    CheckpointManager(root, 3, 0, 1, settings=dict(fp32, flat_layout="a1")).save(FakeEngine("w"), 8, {})
    with pytest.raises(CheckpointError, match="weight layout: the checkpoint has a1, this run b2; this electra_ds "):
        CheckpointManager(root, 3, 0, 1, settings=dict(fp32, flat_layout="b2")).restore(FakeEngine(""))


def test_resume_with_another_learning_rate_or_weight_decay_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    train(corpus, out, "--learning_rate", "1e-3", steps=1)
    with pytest.raises(SetupError, match=r"--learning_rate: the checkpoint has 0.001, this run 0.002; .*new "
                                         "--output_dir"):
        train(corpus, out, "--learning_rate", "2e-3", steps=2)
    with pytest.raises(SetupError, match=r"--weight_decay: the checkpoint has 0.01, this run 0.0; .*new --output_dir"):
        train(corpus, out, "--learning_rate", "1e-3", "--weight_decay", "0", steps=2)
    assert sorted(losses(train(corpus, out, "--learning_rate", "1e-3", steps=2))) == [1, 2]


def test_resume_under_another_zero_stage_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    train(corpus, out, steps=1)  # fp32, ZeRO 0
    with pytest.raises(SetupError, match=r"ZeRO stage: the checkpoint has 0, this run 2; .*--deepspeed_config, or "
                                         r"export its weights \(python -m electra_ds.convert to-hf"):
        train(corpus, out, "--deepspeed_config", "bf16_zero2", steps=2)


def test_logged_lr_is_the_rate_the_step_used(corpus, tmp_path):
    """Step k's update uses lr * factor(k - 1) (the schedule steps after it): 0 at step 1 with warmup."""
    records = [r for r in train(corpus, tmp_path / "out", "--learning_rate", "1e-3", steps=3) if r["split"] == "train"]
    factor = linear_warmup_decay(2, 3)
    assert [r["lr"] for r in records] == pytest.approx([1e-3 * factor(k - 1) for k in (1, 2, 3)])
    assert records[0]["lr"] == 0.0


def test_non_finite_weights_are_not_checkpointed(corpus, tmp_path, monkeypatch):
    """A NaN update between logging steps stops the run at the next save, naming the last good checkpoint."""
    step_once = pretrain.pretraining_step

    def nan_after_step_2(engine, batch, *, step, **kw):
        out = step_once(engine, batch, step=step, **kw)
        if step == 1:  # micro-batch 1 = step 2's update
            with torch.no_grad():
                next(engine.module.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(pretrain, "pretraining_step", nan_after_step_2)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"non-finite weights at step 2: .*step00000001\. Lower"):
        train(corpus, out, "--save_steps", "4", "--logging_steps", "4000", steps=4)  # saves every step, logs at 4
    assert [t for _, t in CheckpointManager(out / "checkpoints", 3, 0, 1).complete()] == ["step00000001"]


def test_output_dir_of_another_experiment_is_refused(corpus, tmp_path):
    out = tmp_path / "out"
    train(corpus, out, steps=1)
    with pytest.raises(SetupError, match=r"another model \(generator_size: 0.5 -> 1.0\)"):
        train(corpus, out, "--generator_size", "1.0", steps=2)
    with pytest.raises(SetupError, match="--resume none"):
        train(corpus, out, "--resume", "none", steps=2)
