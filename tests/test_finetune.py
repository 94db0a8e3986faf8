"""GLUE fine-tuning: a tiny model learns a made task, evaluation is deterministic, layer-wise lrs follow both
rules, submission files, HF discriminator directories, bad input, and launch/glue.sh end to end."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import child_env
from electra_ds.config import preset
from electra_ds.data.glue import GlueExample, TASKS
from electra_ds.data.tokenizer import load_tokenizer, special_ids, train_tokenizer
from electra_ds.model.electra import ElectraForPretraining
from electra_ds.model.hf import save_model
from electra_ds.train.finetune import (FinetuneArgs, build_classifier, encode, find_tokenizer, layerwise_lr_decay,
                                       load_discriminator, load_task_data, loss_fn, make_engine, predict, run_task,
                                       train_order)
from electra_ds.train.layerwise_lr import group_fn

from test_glue_data import make_glue_dir

REPO = Path(__file__).resolve().parents[1]
POSITIVE, NEGATIVE = ["good", "great", "fine", "lovely", "superb"], ["bad", "awful", "poor", "dull", "terrible"]
FILLER = "the a movie film plot story actor scene was is very quite and but this that it".split()


def _sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def _keyword_task(glue_dir: Path, n_train: int = 200, n_dev: int = 100, n_test: int = 10) -> None:
    """SST-2 layout; the label is whether the sentence holds a positive or a negative word."""
    rng = random.Random(0)
    folder = glue_dir / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        labels = [rng.randint(0, 1) for _ in range(n)]
        rows = [f"{_sentence(rng, y)} \t{y}" for y in labels]
        (folder / f"{split}.tsv").write_text("\n".join(["sentence\tlabel", *rows]) + "\n")
    rows = [f"{i}\t{_sentence(rng, i % 2)}" for i in range(n_test)]
    (folder / "test.tsv").write_text("\n".join(["index\tsentence", *rows]) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A made GLUE dir (all tasks, plus the keyword task as SST-2) and a pretraining output dir holding a
    tiny model (our format), its tokenizer and metrics.jsonl."""
    root = tmp_path_factory.mktemp("finetune")
    glue_dir = make_glue_dir(root)
    _keyword_task(glue_dir)
    rng = random.Random(1)
    texts = [_sentence(rng, i % 2) for i in range(200)] + [p.read_text() for p in glue_dir.rglob("*.tsv")]
    tok_dir = train_tokenizer(texts, 300, root / "tokenizer", min_frequency=1)
    vocab = load_tokenizer(tok_dir).get_vocab_size()
    run = root / "pretrain_run"
    torch.manual_seed(0)
    save_model(ElectraForPretraining(preset("tiny", vocab_size=vocab)), run / "model")
    shutil.copytree(tok_dir, run / "tokenizer")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "pfs_days": 1e-9}) + "\n"
                                       + json.dumps({"step": 2, "pfs_days": 2e-9}) + "\n")
    return {"root": root, "glue": glue_dir, "run": run, "tokenizer": tok_dir, "vocab": vocab}


def test_tiny_model_beats_chance_and_writes_submission(setup):
    out = setup["root"] / "out_keyword"
    args = FinetuneArgs(learning_rate=1e-3, epochs=5, batch_size=16)
    result = run_task(setup["run"], "sst2", out, seeds=[0], args=args, glue_dir=setup["glue"])
    run = result["runs"][0]
    assert run["steps"] == 200 * 5 // 16 and run["warmup_steps"] == 6
    assert run["dev"]["dev"]["accuracy"] >= 0.75, run  # chance is 0.5 (CPU fp32 reaches 1.0, GPU bf16 0.88)
    report = json.loads((out / "results.json").read_text())
    assert report["table"]["SST-2"] == pytest.approx(100 * run["dev"]["dev"]["accuracy"])
    assert report["efficiency"]["pretrain_pfs_days"] == 2e-9  # the last record of the run's metrics.jsonl
    rows = (out / "submission" / "SST-2.tsv").read_text().splitlines()
    assert rows[0] == "index\tprediction" and [r.split("\t")[0] for r in rows[1:]] == [str(i) for i in range(10)]
    assert sum(r.split("\t")[1] == str(i % 2) for i, r in enumerate(rows[1:])) >= 8  # test labels are i % 2
    dev_rows = (out / "SST-2" / "seed_0" / "dev.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in dev_rows[1:]] == [str(i) for i in range(100)]  # Hugging Face's idx


def test_pair_tasks_regression_and_mnli_submission_files(setup):
    out = setup["root"] / "out_pairs"
    args = FinetuneArgs(max_steps=2, batch_size=2, eval_batch_size=3)
    for task in ("STS-B", "MNLI", "QNLI"):
        result = run_task(setup["run"] / "model", task, out, seeds=[0, 1], args=args, glue_dir=setup["glue"],
                          tokenizer_path=setup["tokenizer"])
        assert result["status"] == "ok" and len(result["runs"]) == 2
    sub = out / "submission"
    assert sorted(p.name for p in sub.iterdir()) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv", "STS-B.tsv"]
    for name, n_rows, allowed in (("MNLI-m", 1, TASKS["MNLI"].labels), ("AX", 2, TASKS["MNLI"].labels),
                                  ("QNLI", 1, TASKS["QNLI"].labels)):
        rows = (sub / f"{name}.tsv").read_text().splitlines()
        assert rows[0] == "index\tprediction" and len(rows) == n_rows + 1
        assert all(r.split("\t")[1] in allowed for r in rows[1:]), rows
    score = (sub / "STS-B.tsv").read_text().splitlines()[1].split("\t")[1]
    assert 0.0 <= float(score) <= 5.0 and len(score.split(".")[1]) == 3
    tasks = json.loads((out / "results.json").read_text())["tasks"]
    assert set(tasks["MNLI"]["summary"]) == {"dev_matched", "dev_mismatched"}
    assert set(tasks["STS-B"]["summary"]["dev"]) == {"spearman", "pearson"}

    no_qqp = setup["root"] / "no_qqp"
    shutil.copytree(setup["glue"], no_qqp, ignore=shutil.ignore_patterns("QQP"))
    absent = run_task(setup["run"], "QQP", out, seeds=[0], args=args, glue_dir=no_qqp)
    assert absent["status"] == "absent" and "QQP train" in absent["reason"]
    assert "QQP: absent" in (out / "results.md").read_text()


def test_encoding_pairs_and_truncation(setup):
    tok = load_tokenizer(setup["tokenizer"])
    ids = special_ids(tok)
    long_a = " ".join(["movie"] * 20)
    enc = encode(tok, [GlueExample("0", long_a, "good film", 1), GlueExample("1", "a", "the plot", 0)], 10)
    first, second = enc.input_ids
    assert len(first) == 10 and first[0] == ids["cls"] and first[-1] == ids["sep"]
    # the longer segment is cut first: b keeps its tokens, a gives up the rest
    b_len = len(tok.encode("good film", add_special_tokens=False).ids)
    assert list(enc.token_type_ids[0]) == [0] * (10 - b_len - 1) + [1] * (b_len + 1)
    assert second[0] == ids["cls"] and list(second).count(ids["sep"]) == 2
    literal = encode(tok, [GlueExample("0", "good [SEP] film [MASK]", None, 1)], 32).input_ids[0]
    assert list(literal).count(ids["sep"]) == 1 and ids["mask"] not in literal  # text, not special tokens
    single = encode(tok, [GlueExample("0", long_a, None, 0)], 6).input_ids[0]
    assert len(single) == 6 and single[-1] == ids["sep"]
    # an empty second segment (QQP has empty questions) is one segment, as google-research/electra has it
    empty_b = encode(tok, [GlueExample("0", "good film", "", 1), GlueExample("1", "good film", "the plot", 0)], 32)
    alone = encode(tok, [GlueExample("0", "good film", None, 1)], 32)
    assert list(empty_b.input_ids[0]) == list(alone.input_ids[0]) and not empty_b.token_type_ids[0].any()
    assert list(empty_b.input_ids[1]).count(ids["sep"]) == 2  # the pair after it keeps its second segment
    batch = enc.batch([0, 1])
    assert batch["input_ids"].shape == (2, 10) and batch["attention_mask"][1].sum() == len(second)
    assert (batch["input_ids"][1, len(second):] == ids["pad"]).all()
    order = train_order(10, 4, 6, seed=3)
    assert order.shape == (6, 4) and sorted(order.reshape(-1)[:10]) == list(range(10))


def test_recipe_of_google_research_electra(setup):
    """Layer-wise decay by size, both pair orders for MRPC/STS-B, STS-B targets scaled to 0..1, a Glorot head."""
    assert layerwise_lr_decay(FinetuneArgs(), preset("large")) == 0.9
    assert layerwise_lr_decay(FinetuneArgs(), preset("small")) == 0.8
    assert layerwise_lr_decay(FinetuneArgs(layerwise_lr_decay=0.5), preset("large")) == 0.5
    for name, doubled in (("MRPC", True), ("STS-B", True), ("RTE", False)):
        once = load_task_data(TASKS[name], setup["glue"], with_test=False).train
        twice = load_task_data(TASKS[name], setup["glue"], with_test=False, double_unordered=True).train
        swapped = [(r.guid, r.text_b, r.text_a, r.label) for r in once]
        assert [tuple(r) for r in twice] == ([tuple(r) for r in once] + swapped if doubled else
                                             [tuple(r) for r in once]), name
    assert loss_fn(torch.tensor([[0.8]]), torch.tensor([4.0]), TASKS["STS-B"]).item() == pytest.approx(0.0)
    assert loss_fn(torch.tensor([[0.6]]), torch.tensor([4.0]), TASKS["STS-B"]).item() == pytest.approx(0.2 ** 2)
    weight = build_classifier(load_discriminator(setup["run"]), TASKS["RTE"], seed=0).named_weights()[
        "classifier.weight"]
    bound = (6 / sum(weight.shape)) ** 0.5  # Glorot uniform; the encoder's normal(0.02) would stay far below it
    assert bound * 0.8 < weight.abs().max() <= bound


def _engine(setup, task_name: str, rule: str = "intended", warmup: int = 0):
    disc = load_discriminator(setup["run"])
    args = FinetuneArgs(layerwise_lr_decay_rule=rule, layerwise_lr_decay=0.5, batch_size=4)
    model = build_classifier(disc, TASKS[task_name], seed=0)
    return make_engine(model, args, lr=1e-3, steps=10, warmup=warmup)


@pytest.mark.parametrize("rule,extra", [("intended", 0), ("original", 1)])
def test_layerwise_lr_per_group(setup, rule, extra):
    engine = _engine(setup, "RTE", rule)
    num_layers = engine.module.config.num_hidden_layers  # 2 in the tiny preset
    expected = {"head": 1.0, "embeddings": 0.5 ** (num_layers + 1 + extra)}
    expected.update({f"layer_{l}": 0.5 ** (num_layers - l + extra) for l in range(num_layers)})
    groups = engine.optimizer.param_groups
    assert sorted(g["name"] for g in groups) == sorted(f"{d}_{k}" for d in expected for k in ("decay", "no_decay"))
    for group, lr in zip(groups, engine.get_lr()):
        depth, decays = group["name"].rsplit("_no_decay", 1)[0].rsplit("_decay", 1)[0], \
            not group["name"].endswith("no_decay")
        assert lr == pytest.approx(1e-3 * expected[depth]), group["name"]
        assert group["weight_decay"] == (0.01 if decays else 0.0)
    assert group_fn("electra.encoder.layer.1.output.LayerNorm.weight") == "layer_1_no_decay"
    assert group_fn("electra.embeddings_project.weight") == "embeddings_decay"
    assert group_fn("classifier.bias") == "head_no_decay"


def test_evaluation_is_deterministic(setup):
    engine = _engine(setup, "STS-B")
    tok = load_tokenizer(setup["tokenizer"])
    rows = [GlueExample(str(i), _sentence(random.Random(i), i % 2), "the plot was fine", 1.0) for i in range(12)]
    data = encode(tok, rows, 32, regression=True)
    unit_scores = dataclasses.replace(TASKS["STS-B"], score_max=1.0)  # the model's raw output
    first = predict(engine, data, 5, unit_scores)
    second = predict(engine, data, 12, unit_scores)
    np.testing.assert_array_equal(first, predict(engine, data, 5, unit_scores))  # bit-identical again
    np.testing.assert_allclose(predict(engine, data, 5, TASKS["STS-B"]), 5 * first, rtol=1e-6)
    assert predict(engine, encode(tok, [], 32), 5, TASKS["RTE"]).shape == (0,)  # an empty test split
    np.testing.assert_allclose(first, second, rtol=2e-2, atol=2e-2)  # other batches: rounding only (bf16 on GPU)
    assert engine.module.training  # predict restores the mode it found: training ...
    engine.eval()
    predict(engine, data, 5, unit_scores)
    assert not engine.module.training  # ... or eval (DeepSpeedEngine.training itself never changes)
    batch = {k: v.to(engine.device) for k, v in data.batch(range(12)).items()}
    with torch.no_grad():
        engine.train()
        noisy = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[:, 0].float().cpu().numpy()
    assert not np.allclose(noisy, second)  # dropout is active in training mode, so eval mode matters


def test_hugging_face_discriminator_dir_and_bad_models(setup, tmp_path):
    from safetensors.torch import save_file

    disc = load_discriminator(setup["run"])
    cfg = disc.config
    hf_config = {"model_type": "electra", "architectures": ["ElectraForPreTraining"], "hidden_act": "gelu",
                 **{k: getattr(cfg, k) for k in ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads", "intermediate_size", "max_position_embeddings",
                                                 "type_vocab_size", "layer_norm_eps")}}
    hf_dir = tmp_path / "hf_disc"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_config))
    save_file({k.removeprefix("discriminator."): v.contiguous() for k, v in disc.weights.items()},
              str(hf_dir / "model.safetensors"))
    shutil.copy(setup["tokenizer"] / "vocab.txt", hf_dir / "vocab.txt")
    loaded = load_discriminator(hf_dir)
    assert loaded.config.hidden_size == cfg.hidden_size and loaded.tokenizer_path == hf_dir
    assert loaded.weights_sha256 == disc.weights_sha256  # the same weights, whatever the format
    a = build_classifier(loaded, TASKS["RTE"], seed=0).named_weights()
    b = build_classifier(disc, TASKS["RTE"], seed=0).named_weights()
    assert all(torch.equal(a[k], b[k]) for k in a)

    generator = tmp_path / "hf_gen"
    shutil.copytree(hf_dir, generator)
    (generator / "config.json").write_text(json.dumps({**hf_config, "architectures": ["ElectraForMaskedLM"]}))
    with pytest.raises(ValueError, match="expected ElectraForPreTraining"):
        load_discriminator(generator)
    headless = tmp_path / "hf_headless"
    shutil.copytree(hf_dir, headless)
    (headless / "config.json").write_text(json.dumps({**hf_config, "architectures": []}))
    save_file({"electra.embeddings.word_embeddings.weight": torch.zeros(3, 2)}, str(headless / "model.safetensors"))
    with pytest.raises(ValueError, match="not an ElectraForPreTraining checkpoint"):
        load_discriminator(headless)

    other_vocab = tmp_path / "other_tok"
    train_tokenizer(["completely different words here and there"] * 3, 40, other_vocab, min_frequency=1)
    with pytest.raises(ValueError, match=r"has \d+ token ids but model .* has a vocabulary of"):
        run_task(setup["run"], "RTE", tmp_path / "out", seeds=[0], args=FinetuneArgs(max_steps=1),
                 glue_dir=setup["glue"], tokenizer_path=other_vocab)


def _cli():
    spec = importlib.util.spec_from_file_location("glue_cli", REPO / "launch" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_errors(setup, tmp_path, capsys):
    cli = _cli()
    assert cli.main(["--model", str(setup["run"]), "--task", "SQuAD", "--output_dir", str(tmp_path)]) == 2
    assert "unknown GLUE task 'SQuAD'" in capsys.readouterr().err
    bad = tmp_path / "glue"
    (bad / "RTE").mkdir(parents=True)
    (bad / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tyes\n")
    (bad / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    assert cli.main(["--model", str(setup["run"]), "--task", "RTE", "--output_dir", str(tmp_path / "o"),
                     "--glue_dir", str(bad)]) == 2
    assert "RTE/train.tsv:2: unknown RTE label 'yes'" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "nowhere"), "--task", "RTE", "--output_dir", str(tmp_path / "o"),
                     "--glue_dir", str(setup["glue"])]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_glue_sh_end_to_end(setup):
    """A local copy without QQP and MNLI (as ../shared/data/glue): those are absent, the run succeeds."""
    out = setup["root"] / "out_sh"
    glue = setup["root"] / "glue_sh"
    shutil.copytree(setup["glue"], glue, ignore=shutil.ignore_patterns("QQP", "MNLI"))
    env = {**child_env(), "TASKS": "SST-2,QQP,MNLI", "SEEDS": "1", "MAX_TRAIN_SAMPLES": "32", "EPOCHS": "1",
           "SKIP_TEST": "1", "GLUE_DIR": str(glue), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "launch" / "glue.sh"), str(setup["run"]), str(out), "--batch_size", "8"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["tasks"]["SST-2"]["status"] == "ok"
    assert report["tasks"]["SST-2"]["runs"][0]["steps"] == 32 // 8
    assert report["tasks"]["QQP"]["status"] == report["tasks"]["MNLI"]["status"] == "absent"
    assert "| SST-2 |" in proc.stdout and not (out / "submission").exists()


def test_missing_data_keeps_results_and_a_bad_data_source_is_an_error(setup, tmp_path, monkeypatch, capsys):
    """A task missing from a GLUE dir is absent, but keeps its earlier result and submission file; a GLUE dir that
    does not exist, or Hugging Face failing, exits non-zero and changes nothing."""
    out = tmp_path / "out"
    args = FinetuneArgs(max_steps=1, batch_size=2)
    run_task(setup["run"], "RTE", out, seeds=[0], args=args, glue_dir=setup["glue"])
    before, submission = (out / "RTE" / "result.json").read_text(), (out / "submission" / "RTE.tsv").read_text()
    no_rte = tmp_path / "no_rte"
    shutil.copytree(setup["glue"], no_rte, ignore=shutil.ignore_patterns("RTE"))
    with pytest.warns(UserWarning, match=r"RTE is absent \(RTE train: no file .*\); keeping its earlier result"):
        assert run_task(setup["run"], "RTE", out, seeds=[0], args=args, glue_dir=no_rte)["status"] == "absent"

    cli = _cli()
    common = ["--model", str(setup["run"]), "--task", "RTE", "--output_dir", str(out), "--seeds", "1"]
    assert cli.main([*common, "--glue_dir", str(tmp_path / "glu")]) == 2
    assert f"GLUE directory {tmp_path / 'glu'} does not exist" in capsys.readouterr().err
    datasets = pytest.importorskip("datasets")

    def offline(*_args, **_kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert cli.main(common) == 2
    assert "could not load nyu-mll/glue/rte split train from Hugging Face" in capsys.readouterr().err
    env = {**child_env(), "TASKS": "RTE", "GLUE_DIR": str(tmp_path / "glu"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "launch" / "glue.sh"), str(setup["run"]), str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    # refused by glue.sh itself: under a LAUNCHER (torchrun) glue.py's own check would fail in every process
    assert proc.returncode == 2 and f"GLUE_DIR={tmp_path / 'glu'} is not a directory" in proc.stderr
    assert (out / "RTE" / "result.json").read_text() == before
    assert (out / "submission" / "RTE.tsv").read_text() == submission


def test_results_of_other_weights_under_the_same_path_are_refused(setup, tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(setup["run"], run)
    args = FinetuneArgs(max_steps=1, batch_size=2)
    first = run_task(run, "RTE", out, seeds=[0], args=args, glue_dir=setup["glue"], predict_test=False)
    assert first["weights_sha256"] == load_discriminator(setup["run"]).weights_sha256
    torch.manual_seed(1)  # the run pretrained further: the same path, other weights
    save_model(ElectraForPretraining(preset("tiny", vocab_size=setup["vocab"])), run / "model")
    with pytest.raises(ValueError, match=r"holds GLUE results \(RTE\) of other weights than .*run holds now.*"
                                         r"another --output_dir"):
        run_task(run, "WNLI", out, seeds=[0], args=args, glue_dir=setup["glue"], predict_test=False)
    assert not (out / "WNLI").exists()


def test_seeds_finished_with_the_same_settings_are_reused(setup, tmp_path, monkeypatch):
    """A call interrupted after some seeds (no result.json yet) loses none of them; other settings train anew."""
    from electra_ds.train import finetune

    trained, fine_tune = [], finetune.finetune_seed
    monkeypatch.setattr(finetune, "finetune_seed", lambda *a, **k: trained.append(a[4]) or fine_tune(*a, **k))
    out = tmp_path / "out"
    common = {"glue_dir": setup["glue"], "predict_test": False}
    first = run_task(setup["run"], "RTE", out, seeds=[0], args=FinetuneArgs(max_steps=1, batch_size=2), **common)
    (out / "RTE" / "result.json").unlink()
    second = run_task(setup["run"], "RTE", out, seeds=[0, 1], args=FinetuneArgs(max_steps=1, batch_size=2), **common)
    assert trained == [0, 1] and second["runs"][0] == first["runs"][0]
    third = run_task(setup["run"], "RTE", out, seeds=[0, 1], args=FinetuneArgs(max_steps=2, batch_size=2), **common)
    assert trained == [0, 1, 0, 1] and [r["steps"] for r in third["runs"]] == [2, 2]


def test_results_of_another_model_are_refused_before_training(setup, tmp_path, monkeypatch):
    from electra_ds.train.glue_report import write_task_result

    out = tmp_path / "out"
    cola = {"task": "CoLA", "status": "ok", "runs": [{"seed": 0, "dev": {"dev": {"mcc": 0.1}}}]}
    write_task_result(out, {**cola, "model_path": str(tmp_path / "another_run")})
    with pytest.raises(ValueError, match="holds GLUE results of another model: .*another_run \\(CoLA\\)"):
        run_task(setup["run"], "RTE", out, seeds=[0], args=FinetuneArgs(max_steps=1), glue_dir=setup["glue"])
    assert not (out / "RTE").exists()
    write_task_result(out, {**cola, "model_path": str(setup["run"] / "hf")})
    monkeypatch.chdir(setup["run"].parent)  # the same model named by a relative path from elsewhere
    result = run_task(setup["run"].name, "RTE", out, seeds=[0], args=FinetuneArgs(max_steps=1, batch_size=2),
                      glue_dir=setup["glue"], predict_test=False)
    assert result["model_path"] == str(setup["run"].resolve())  # stored absolute: comparable from any directory
    result = run_task(setup["run"], "RTE", out, seeds=[0], args=FinetuneArgs(max_steps=1, batch_size=2),
                      glue_dir=setup["glue"], predict_test=False)  # the same run, named through its export
    assert result["status"] == "ok"


def test_tokenizer_of_a_pretraining_run_is_found_in_its_cache(setup, tmp_path):
    """Pretraining keeps its tokenizer in the token cache that run_config.json names (the HF export copies it, but
    --no-export_hf runs and checkpoints have only the cache)."""
    cache = tmp_path / "caches" / "corpus-abc"
    shutil.copytree(setup["tokenizer"], cache / "tokenizer")
    run = tmp_path / "run"
    (run / "checkpoints" / "step00000002").mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"data": str(cache)}))
    assert find_tokenizer(run) == cache / "tokenizer"
    assert find_tokenizer(run / "checkpoints" / "step00000002") == cache / "tokenizer"
    assert find_tokenizer(tmp_path / "caches") is None


@pytest.mark.slow
def test_two_ranks_fine_tune_like_one(setup, tmp_path):
    """Data parallelism: 2 ranks, each on its half of every batch (gradients averaged), make the same STS-B dev
    predictions as 1 rank on the whole batch (dropout off, so the only difference is summation order)."""
    from electra_ds.train.engine import free_port

    model = tmp_path / "no_dropout"
    torch.manual_seed(0)
    save_model(ElectraForPretraining(preset("tiny", vocab_size=setup["vocab"], hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0)), model / "model")
    shutil.copytree(setup["tokenizer"], model / "tokenizer")
    glue = tmp_path / "glue"
    rng = random.Random(2)
    for split, n in (("train", 64), ("dev", 40)):  # STS-B layout; the score follows the keyword's polarity
        rows = [f"{i}\tmain\tMSRvid\t2012\t{i:04d}\tnone\tnone\t{_sentence(rng, i % 2)}\t{_sentence(rng, 1)}\t"
                f"{4 * (i % 2) + rng.random():.3f}" for i in range(n)]
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        (glue / "STS-B").mkdir(parents=True, exist_ok=True)
        (glue / "STS-B" / f"{split}.tsv").write_text("\n".join([header, *rows]) + "\n")
    common = ["--model", str(model), "--task", "STS-B", "--glue_dir", str(glue), "--seeds", "1",
              "--max_train_samples", "64", "--epochs", "1", "--batch_size", "16", "--learning_rate", "1e-3",
              "--no_test"]
    glue_py = str(REPO / "launch" / "glue.py")
    launchers = {"one": [sys.executable], "two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  "2", "--master_port", str(free_port())]}
    preds = {}
    for name, launcher in launchers.items():
        out = tmp_path / name
        proc = subprocess.run([*launcher, glue_py, *common, "--output_dir", str(out)],
                              env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (dev,) = out.glob("STS-B/**/dev.tsv")
        preds[name] = np.array([float(line.split("\t")[1]) for line in dev.read_text().splitlines()[1:]])
        preds[name + " metrics"] = json.loads((dev.parent / "run.json").read_text())["dev"]["dev"]
    assert len(preds["one"]) == len(preds["two"]) > 10 and preds["one"].std() > 0
    np.testing.assert_allclose(preds["two"], preds["one"], atol=1.5e-3)  # the TSV rounds scores to 0.001
    assert preds["two metrics"] == pytest.approx(preds["one metrics"], abs=1e-4)  # from unrounded predictions


def test_a_tokenizer_with_gaps_in_its_ids_fits_its_model(setup, tmp_path):
    """The model's vocabulary is the largest token id + 1 (as pretraining sizes it), not the count of tokens."""
    spec = json.loads((setup["tokenizer"] / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    dropped = next(token for token, i in vocab.items() if i == len(vocab) // 2)
    del vocab[dropped]  # one id unused: count n - 1, largest id + 1 still n
    gapped = tmp_path / "gapped"
    gapped.mkdir()
    (gapped / "tokenizer.json").write_text(json.dumps(spec))
    result = run_task(setup["run"], "RTE", tmp_path / "out", seeds=[0], glue_dir=setup["glue"], predict_test=False,
                      args=FinetuneArgs(max_steps=1, batch_size=2), tokenizer_path=gapped)
    assert result["status"] == "ok"
