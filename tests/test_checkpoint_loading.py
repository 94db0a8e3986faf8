"""A pretraining run's DeepSpeed checkpoint loads into our model and exports to Hugging Face (ZeRO 0 and 2)."""
import json
import shutil

import pytest
import torch

from conftest import saved_environ
from electra_ds.config import preset
from electra_ds.convert import main as convert_main
from electra_ds.model import ElectraForPretraining, load_pretrained
from electra_ds.train.checkpoint import MANIFEST, CheckpointManager


@pytest.fixture(scope="module", autouse=True)
def one_process_world():
    from electra_ds.train.engine import setup_distributed

    with saved_environ():
        setup_distributed()
        yield


@pytest.mark.parametrize("stage, bf16", [(0, False), (2, True)])
def test_deepspeed_checkpoint_loads(tmp_path, stage, bf16):
    import deepspeed

    config = preset("tiny", vocab_size=120)
    torch.manual_seed(stage)
    model = ElectraForPretraining(config)
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=1e-3)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    out = tmp_path / "run"
    CheckpointManager(out / "checkpoints", keep=2, rank=0, world_size=1).save(engine, 1, {})
    (out / "run_config.json").write_text(json.dumps({"model": config.to_dict()}))
    expected = {k: v.detach().float().clone() for k, v in engine.module.views().items()}
    engine.destroy()

    loaded = load_pretrained(out / "checkpoints" / "step00000001")
    got = loaded.views()
    tol = 1e-2 if bf16 else 0.0  # bf16 module weights vs the fp32 master copy zero_to_fp32 returns
    assert all(torch.allclose(got[k], v, atol=tol, rtol=tol) for k, v in expected.items())
    broken = out / "checkpoints" / "step00000002"  # newer, but unfinished: no manifest; DeepSpeed's `latest` names it
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"cut off")
    (out / "checkpoints" / "latest").write_text(broken.name)
    newest_complete = load_pretrained(out).views()
    assert all(torch.equal(newest_complete[k], got[k]) for k in got)
    if stage == 0:  # a complete checkpoint whose weights file is damaged (same size): the older one loads
        damaged = out / "checkpoints" / "step00000003"
        shutil.copytree(out / "checkpoints" / "step00000001", damaged)
        states = damaged / "mp_rank_00_model_states.pt"
        states.write_bytes(b"x" * states.stat().st_size)
        assert all(torch.equal(load_pretrained(out).views()[k], got[k]) for k in got)
        good = out / "checkpoints" / "step00000001" / states.name
        intact = good.read_bytes()
        shutil.copyfile(states, good)
        with pytest.raises(ValueError, match="no usable checkpoint.*step00000003: .*step00000001: "):
            load_pretrained(out)
        good.write_bytes(intact)
        shutil.rmtree(damaged)
    assert convert_main(["to-hf", str(out / "checkpoints" / "step00000001"), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "discriminator" / "config.json").is_file()

    (out / "run_config.json").write_text(json.dumps({"model": preset("tiny", vocab_size=121).to_dict()}))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_pretrained(out / "checkpoints" / "step00000001")
    (out / "run_config.json").write_text(json.dumps({"model": config.to_dict()}))
    manifest = out / "checkpoints" / "step00000001" / MANIFEST  # as a run records it: its flat buffers' layout
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), flat_layout=model.layout_fingerprint())))
    assert load_pretrained(out / "checkpoints" / "step00000001").layout_fingerprint() == model.layout_fingerprint()
    manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), flat_layout="0123456789abcdef")))
    with pytest.raises(ValueError, match="orders the weights in its flat buffers otherwise"):
        load_pretrained(out / "checkpoints" / "step00000001")
