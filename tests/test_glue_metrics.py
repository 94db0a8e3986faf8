"""GLUE metrics against hand values and scipy/sklearn; the results report, efficiency line and submission files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score, matthews_corrcoef

from electra_ds.data.glue import TABLE_TASKS, TASKS
from electra_ds.train.glue_metrics import compute_metrics, summarize
from electra_ds.train.glue_report import (build_report, format_prediction, pretrain_pfs_days, primary_score,
                                          seed_dir, write_predictions, write_task_result)


def test_metrics_match_hand_values_and_libraries():
    gold, pred = [1, 1, 0, 0], [1, 0, 0, 0]  # TP 1, FN 1, TN 2, FP 0
    assert compute_metrics("mcc", pred, gold)["mcc"] == pytest.approx(2 / math.sqrt(12))
    out = compute_metrics("accuracy_f1", pred, gold)
    assert out == pytest.approx({"accuracy": 0.75, "f1": 2 / 3})
    assert compute_metrics("accuracy", [2, 1, 0], [2, 0, 0]) == pytest.approx({"accuracy": 2 / 3})
    scores, truth = [0.1, 0.4, 0.9, 3.0, 4.2], [0.0, 1.0, 2.0, 3.0, 4.0]
    corr = compute_metrics("correlation", scores, truth)
    assert corr["spearman"] == pytest.approx(1.0) and corr["pearson"] < 1.0
    assert corr["pearson"] == pytest.approx(stats.pearsonr(scores, truth)[0])

    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert compute_metrics("mcc", pred, gold)["mcc"] == pytest.approx(matthews_corrcoef(gold, pred))
    assert compute_metrics("accuracy_f1", pred, gold)["f1"] == pytest.approx(f1_score(gold, pred))
    x, y = rng.normal(size=100), rng.normal(size=100)
    corr = compute_metrics("correlation", x, y)
    assert corr == pytest.approx({"spearman": stats.spearmanr(x, y)[0], "pearson": stats.pearsonr(x, y)[0]})


def test_metric_edge_cases():
    assert compute_metrics("correlation", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {"spearman": 0.0, "pearson": 0.0}
    assert compute_metrics("mcc", [1, 1, 1], [0, 1, 0])["mcc"] == 0.0
    # a diverged seed (NaN scores) scores 0 and the summary over seeds still works
    diverged = compute_metrics("correlation", [np.nan, 1.0, 2.0], [1.0, 2.0, 3.0])
    assert diverged == {"spearman": 0.0, "pearson": 0.0}
    assert summarize([0.8, diverged["spearman"]]) == pytest.approx({"median": 0.4, "mean": 0.4, "std": 0.32 ** 0.5,
                                                                     "min": 0.0, "max": 0.8, "n": 2})
    with pytest.raises(ValueError, match="unknown GLUE metric"):
        compute_metrics("bleu", [1], [1])
    with pytest.raises(ValueError, match="equal-length"):
        compute_metrics("accuracy", [1, 0], [1])
    s = summarize([0.5, 0.7, 0.6])
    assert s["median"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1) and (s["min"], s["max"], s["n"]) == \
        (0.5, 0.7, 3)
    assert summarize([0.4])["std"] == 0.0


def test_summary_median_is_the_middle_value_not_the_mean():
    s = summarize([0.1, 0.9, 0.2])
    assert s["median"] == pytest.approx(0.2) and s["mean"] == pytest.approx(0.4)
    assert summarize([0.1, 0.2, 0.9, 1.0])["median"] == pytest.approx(0.55)


def test_sts_b_is_scored_by_spearman():
    """GLUE's STS-B table metric (as ELECTRA reports it) is Spearman's correlation, not Pearson's."""
    stsb = TASKS["STS-B"]
    assert stsb.metric == "correlation" and stsb.primary == "spearman"
    run = {"dev": {"dev": {"spearman": 0.81, "pearson": 0.86}}}
    assert primary_score(stsb, run) == 0.81
    summary = {"dev": {"spearman": {"median": 0.8}, "pearson": {"median": 0.9}}}
    assert primary_score(stsb, summary, "median") == 0.8


def test_prediction_format():
    assert format_prediction(TASKS["STS-B"], 5.7) == "5.000" and format_prediction(TASKS["STS-B"], -1) == "0.000"
    assert format_prediction(TASKS["STS-B"], 2.34567) == "2.346"
    assert format_prediction(TASKS["MNLI"], 2) == "contradiction"
    assert format_prediction(TASKS["RTE"], 1) == "not_entailment" and format_prediction(TASKS["CoLA"], 1) == "1"


def _ok_result(task, values, extra=None):
    split = task.dev_splits[0]
    runs = [{"seed": i, "dev": {s: {k: v if k == task.primary and s == split else v - 0.05 for k in
                                    {"mcc": ["mcc"], "accuracy": ["accuracy"], "accuracy_f1": ["accuracy", "f1"],
                                     "correlation": ["spearman", "pearson"]}[task.metric]}
                                for s in task.dev_splits}} for i, v in enumerate(values)]
    return {"task": task.name, "status": "ok", "model": "tiny-run", "runs": runs, **(extra or {})}


def test_report_table_efficiency_and_submission(tmp_path):
    out = tmp_path / "glue"
    run_dir = tmp_path / "pretrain"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 10, "pfs_days": 0.001}) + "\n"
                                           + json.dumps({"step": 20, "pfs_days": 0.002}) + "\n")
    assert pretrain_pfs_days(run_dir / "hf" / "discriminator") == pytest.approx(0.002)
    assert pretrain_pfs_days(run_dir / "checkpoints" / "step00000015") == pytest.approx(0.001)
    assert pretrain_pfs_days(tmp_path / "elsewhere") is None
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 30, "pfs_da')  # cut off by a kill mid-write
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: not a JSON record"):
        assert pretrain_pfs_days(run_dir) == pytest.approx(0.002)

    values = {"CoLA": [0.5, 0.6, 0.55], "SST-2": [0.9, 0.8, 0.85], "MRPC": [0.8], "STS-B": [0.85, 0.87],
              "MNLI": [0.8, 0.78, 0.79], "RTE": [0.6, 0.7, 0.65]}
    test_files = {"SST-2": ["SST-2"], "MNLI": ["AX", "MNLI-m"]}  # what their runs predicted (results' test_files)
    for name, vals in values.items():
        write_task_result(out, _ok_result(TASKS[name], vals, {"pretrain_pfs_days": 0.002,
                                                              "test_files": test_files.get(name, [])}))
    write_task_result(out, {"task": "QNLI", "status": "absent", "reason": "no file QNLI/train.tsv"})
    # test predictions of the best-dev seeds (SST-2 seed 0, MNLI seed 0) and of a worse seed
    sst2, mnli = TASKS["SST-2"], TASKS["MNLI"]
    write_predictions(seed_dir(out, sst2, 0) / "SST-2.tsv", sst2, ["0", "1", "2"], [1, 0, 1])
    write_predictions(seed_dir(out, sst2, 1) / "SST-2.tsv", sst2, ["0", "1", "2"], [0, 0, 0])
    write_predictions(seed_dir(out, mnli, 0) / "MNLI-m.tsv", mnli, ["0", "1"], [0, 2])
    write_predictions(seed_dir(out, mnli, 0) / "AX.tsv", mnli, ["0", "1", "2"], [1, 1, 0])
    # left by an earlier run of CoLA into the same folder; this run of CoLA wrote no test predictions
    cola = TASKS["CoLA"]
    write_predictions(seed_dir(out, cola, 1) / "CoLA.tsv", cola, ["0"], [1])
    write_predictions(out / "submission" / "CoLA.tsv", cola, ["0"], [1])

    report = build_report(out)
    assert report["table"]["CoLA"] == pytest.approx(55.0) and report["table"]["STS-B"] == pytest.approx(86.0)
    assert report["table"]["QQP"] is None and report["table"]["QNLI"] is None
    assert report["avg"] is None  # QQP and QNLI missing: no 8-task AVG
    present = [55.0, 85.0, 80.0, 86.0, 79.0, 65.0]
    assert report["avg_present"] == pytest.approx(sum(present) / 6)
    assert report["tasks"]["QNLI"]["status"] == "absent" and report["tasks"]["QQP"]["status"] == "not_run"
    assert report["tasks"]["MRPC"]["summary"]["dev"]["f1"]["median"] == pytest.approx(0.75)
    assert report["tasks"]["MNLI"]["summary"]["dev_mismatched"]["accuracy"]["median"] == pytest.approx(0.74)
    eff = report["efficiency"]
    assert eff["pretrain_pfs_days"] == 0.002
    assert eff["pfs_days_per_avg_point"] == pytest.approx(0.002 / (sum(present) / 6))
    assert json.loads((out / "results.json").read_text())["table"] == report["table"]

    md = (out / "results.md").read_text()
    header = "| Model | " + " | ".join(TABLE_TASKS) + " | AVG |"
    assert header in md and "| tiny-run | 55.0 | 85.0 | 80.0 | 86.0 | not run | 79.0 | absent | 65.0 |" in md
    assert "QNLI: absent (no file QNLI/train.tsv)" in md and "pfs-days per AVG point" in md
    assert "| MNLI-mm | Acc | 74.0 |" in md and "| STS-B | Pearson |" in md

    sub = out / "submission"
    assert sorted(p.name for p in sub.iterdir()) == ["AX.tsv", "MNLI-m.tsv", "SST-2.tsv"]
    assert (sub / "SST-2.tsv").read_text() == "index\tprediction\n0\t1\n1\t0\n2\t1\n"
    assert (sub / "MNLI-m.tsv").read_text().splitlines()[1:] == ["0\tentailment", "1\tcontradiction"]
    assert (sub / "AX.tsv").read_text().splitlines()[1:] == ["0\tneutral", "1\tneutral", "2\tentailment"]
    assert report["submission"]["SST-2"]["seed"] == 0

    for name in set(TABLE_TASKS) - set(values) - {"QNLI"}:  # complete the 8: AVG appears
        write_task_result(out, _ok_result(TASKS[name], [0.9]))
    write_task_result(out, _ok_result(TASKS["QNLI"], [0.88]))
    full = build_report(out, model_name="named")
    assert full["avg"] == pytest.approx(sum(v for v in full["table"].values()) / 8)
    assert "| named |" in (out / "results.md").read_text()


def test_report_does_not_average_over_different_models(tmp_path):
    out = tmp_path / "glue"
    write_task_result(out, _ok_result(TASKS["CoLA"], [0.5], {"model_path": str(tmp_path / "run_a" / "hf")}))
    write_task_result(out, _ok_result(TASKS["RTE"], [0.6], {"model_path": str(tmp_path / "run_a")}))
    report = build_report(out)
    assert report["models"] == [str(tmp_path / "run_a")] and report["avg_present"] == pytest.approx(55.0)
    write_task_result(out, _ok_result(TASKS["SST-2"], [0.9], {"model_path": str(tmp_path / "run_b")}))
    report = build_report(out)
    assert len(report["models"]) == 2 and report["avg_present"] is None and report["avg"] is None
    assert "come from different models" in (out / "results.md").read_text()


def test_absent_never_replaces_a_result_nor_its_submission(tmp_path):
    """Data missing this time (a mistyped GLUE dir, say) must not erase a task's result and submission file."""
    out, sst2 = tmp_path / "glue", TASKS["SST-2"]
    write_task_result(out, _ok_result(sst2, [0.9], {"test_files": ["SST-2"]}))
    write_predictions(seed_dir(out, sst2, 0) / "SST-2.tsv", sst2, ["0"], [1])
    build_report(out)
    with pytest.warns(UserWarning, match=r"SST-2 is absent \(no file .*\); keeping its earlier result .*SST-2/result"):
        write_task_result(out, {"task": "SST-2", "status": "absent", "reason": "no file SST-2/train.tsv"})
    report = build_report(out)
    assert report["tasks"]["SST-2"]["status"] == "ok" and report["table"]["SST-2"] == pytest.approx(90.0)
    assert (out / "submission" / "SST-2.tsv").read_text() == "index\tprediction\n0\t1\n"
    write_task_result(out, {"task": "RTE", "status": "absent", "reason": "no file RTE/train.tsv"})
    write_task_result(out, {"task": "RTE", "status": "absent", "reason": "no file RTE/dev.tsv"})  # absent again
    assert build_report(out)["tasks"]["RTE"]["reason"] == "no file RTE/dev.tsv"
