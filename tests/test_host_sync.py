"""No host synchronisation in the training step (issue #6): found by `SyncCounter` on the CPU, where DeepSpeed
runs the same engine code as on a GPU. Also: the engine hands gradient clipping to ElectraAdam where it can."""
from __future__ import annotations

import pytest
import torch

from electra_ds.config import preset
from electra_ds.host_sync import SyncCounter, count_engine_step, main
from electra_ds.model import ElectraForPretraining
from electra_ds.train import engine as ds_engine
from electra_ds.train.optim import ElectraAdam
from electra_ds.train.pretrain import pretraining_step

pytestmark = pytest.mark.usefixtures("restore_environ")
SPECIALS = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}


def test_counter_names_each_reading_call_site():
    t = torch.ones(3)
    with SyncCounter() as syncs:
        t.sum().item()
        bool(t.any())
        t.tolist()
        torch.tensor([1.0], device=t.device)
        t.to(t.device)  # a no-op here, not counted (a device tensor's .to("cpu") is)
        t + 1  # stays on the device: not counted
    assert syncs.total == 4
    assert all(site.startswith(__file__) and "test_counter_names_each_reading_call_site" in site
               for site in syncs.sites), syncs.sites


def test_counter_sees_value_dependent_shapes_and_formatting():
    t = torch.arange(6.0)
    mask = t > 2
    with SyncCounter() as syncs:
        t[mask]
        t[mask] = 0.0
        t.masked_select(mask)
        torch.unique(t)
        torch.equal(t, t)
        f"{t.sum():.3f}"
        torch.repeat_interleave(t, torch.ones(6, dtype=torch.long))
    assert syncs.total == 7, syncs.sites
    with SyncCounter() as syncs:
        t[1:3], t[torch.tensor([0, 1])], t.repeat_interleave(2), t + 1  # shapes known without the values
    assert syncs.total == 0, syncs.sites


def test_counter_sees_deepspeed_accelerator_synchronize():
    from deepspeed.accelerator import get_accelerator

    with SyncCounter() as syncs:
        get_accelerator().synchronize()  # a no-op on the CPU, a full wait on a GPU
    assert syncs.total == 1
    assert "synchronize" not in vars(get_accelerator())  # the counting wrapper is gone


def test_deepspeed_throughput_timer_is_off_unless_asked_for():
    """On by default in DeepSpeed, it synchronises the device twice a step (after the second)."""
    assert ds_engine.load_ds_config("bf16", micro_batch_size=2, gradient_accumulation_steps=1,
                                    world_size=1)["timers"] == {"throughput": {"enabled": False}}
    mine = {"timers": {"throughput": {"enabled": True, "synchronized": False}}}
    assert ds_engine.load_ds_config(mine, micro_batch_size=2, gradient_accumulation_steps=1,
                                    world_size=1)["timers"] == mine["timers"]


def test_counter_skips_ignored_functions():
    def check(t):
        return float(t.max())

    with SyncCounter(ignore=("check",)) as syncs:
        check(torch.ones(2))
    assert syncs.total == 0


def engine_for(ds_config: dict | str):
    ds_engine.setup_distributed()
    config = ds_engine.load_ds_config(ds_config, micro_batch_size=2, gradient_accumulation_steps=1, world_size=1)
    model = ElectraForPretraining(preset("tiny", vocab_size=64))
    return ds_engine.initialize(model, config, learning_rate=1e-3, warmup_steps=1, max_steps=10)


@pytest.mark.parametrize("name", ["bf16", "fp32"])
def test_single_process_step_never_waits_for_the_device(name):
    syncs = count_engine_step(name)
    assert syncs.total == 0, f"ds_configs/{name}.json: host syncs in the step: {dict(syncs.sites)}"


@pytest.mark.parametrize("config, where", [
    ({"bf16": {"enabled": True}}, "deepspeed/runtime/utils.py"),  # norm and overflow flag read on the host
    ({"timers": {"throughput": {"enabled": True}}}, "deepspeed/utils/timer.py"),  # DeepSpeed's default timer
])
def test_deepspeed_defaults_we_avoid_do_wait(config, where):
    """Why bf16.json uses torch_autocast and why load_ds_config turns DeepSpeed's throughput timer off. If this
    starts failing, DeepSpeed changed: revisit those choices."""
    syncs = count_engine_step({"gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, **config})
    assert syncs.total >= 2 and any(where in site for site in syncs.sites), dict(syncs.sites)


@pytest.mark.parametrize("name, deepspeed_clip, optimizer_clip", [
    ("bf16", 0.0, 1.0),  # no ZeRO: ElectraAdam sees the whole gradient and clips it on the device
    ("bf16_zero2", 1.0, 0.0),  # ZeRO: the optimizer sees one partition, so only DeepSpeed has the global norm
])
def test_who_clips(name, deepspeed_clip, optimizer_clip):
    engine = engine_for(name)
    try:
        assert engine.gradient_clipping() == deepspeed_clip
        assert engine.basic_optimizer.max_grad_norm == optimizer_clip
    finally:
        engine.destroy()


def test_command_prints_syncs_per_step_and_sites(capsys):
    assert main(["--deepspeed_config", "bf16_zero2", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "bf16_zero2.json: " in out and " host syncs per step" in out and "deepspeed/runtime" in out


def test_optimizer_clipping_equals_clip_then_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(9))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    clipped = ElectraAdam([{"params": params, "weight_decay": 0.01}], lr=0.1, max_grad_norm=1.0)
    plain = ElectraAdam([{"params": twins, "weight_decay": 0.01}], lr=0.1)
    for scale in (10.0, 0.01, 5.0):  # clipped, not clipped (norm < 1), clipped
        grads = [torch.randn(40) * scale, torch.randn(9) * scale]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        clipped.step()
        plain.step()
        assert float(clipped.grad_norm) == pytest.approx(float(norm), rel=1e-6)
        for p, t in zip(params, twins):
            torch.testing.assert_close(p.detach(), t.detach(), rtol=1e-6, atol=1e-7)


def test_bad_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        ElectraAdam([torch.nn.Parameter(torch.zeros(1))], max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="only electra_adam clips"):
        ds_engine.build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1e-3, name="adamw",
                                  max_grad_norm=1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_cuda_step_never_waits_for_the_device(compile_mode):
    """The real check on a GPU: torch.cuda.set_sync_debug_mode("error") raises at any synchronising call."""
    from electra_ds.data.masking import mask_tokens
    from electra_ds.train.pretrain import compile_engine

    engine = engine_for("bf16")
    mask_fn = compile_engine(engine, compile_mode) if compile_mode else mask_tokens
    ids = torch.randint(4, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    host = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    batch = ds_engine.device_batch(host, engine.device)
    kw = dict(special_ids=SPECIALS, mlm_probability=0.15, max_predictions=3, seed=0, mask_fn=mask_fn)
    try:
        for step in range(4):  # compilation and CUDA-graph recording happen here
            pretraining_step(engine, batch, step=step, **kw)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(4, 7):
                out = pretraining_step(engine, batch, step=step, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(out.loss.detach()).item()
    finally:
        engine.destroy()
