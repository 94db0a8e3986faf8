"""GLUE results: per-task result files, the combined results.json / results.md, submission files and the
efficiency line.

Layout under OUT_DIR:

    <TASK>/result.json               one task's runs (seeds) and their dev metrics, or its absence
    <TASK>/seed_<s>/<file>.tsv       that seed's predictions: <dev split>.tsv (dev.tsv, dev_matched.tsv, ...)
                                     and per test split the GLUE server file (CoLA.tsv, MNLI-m.tsv, AX.tsv, ...)
    <TASK>/seed_<s>/run.json         that seed's record (steps, lr, train loss, dev metrics, seconds) and the
                                     settings it ran with (a later call with the same ones reuses it)
    results.json, results.md         all tasks: median and spread over seeds, the seeds' table, efficiency
    submission/<file>.tsv            GLUE server files, each from its task's best-dev seed
"""
from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from electra_ds.data.glue import TABLE_TASKS, TASKS, GlueTask, get_task
from electra_ds.files import atomic_write, replacing
from electra_ds.train.checkpoint import TAG
from electra_ds.train.glue_metrics import METRIC_KEYS, summarize
from electra_ds.train.metrics_log import MetricsFile

RESULT_FILE = "result.json"
RUN_FILE = "run.json"
SUBMISSION_DIR = "submission"
METRIC_NAMES = {"mcc": "MCC", "accuracy": "Acc", "f1": "F1", "spearman": "Spearman", "pearson": "Pearson"}
SPLIT_NAMES = {"dev": "", "dev_matched": "-m", "dev_mismatched": "-mm"}


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def seed_dir(out_dir: str | Path, task: GlueTask, seed: int) -> Path:
    return Path(out_dir) / task.name / f"seed_{seed}"


def model_root(model_path: str | Path) -> Path:
    """The model a path names, without generic folder names: .../run7/hf/discriminator and .../run7 are run7."""
    path = Path(model_path).resolve()
    while path.name in ("discriminator", "hf", "model", "checkpoints") and path.parent != path:
        path = path.parent
    return path


def display_name(model_path: str | Path) -> str:
    """The model's name for tables: its directory, skipping generic names (.../run7/hf/discriminator -> run7)."""
    return model_root(model_path).name


def format_prediction(task: GlueTask, value: float | int) -> str:
    """A prediction as the GLUE server wants it: the label name, or an STS-B score clipped to [0, 5]."""
    if task.is_regression:
        return f"{min(task.score_max, max(0.0, float(value))):.3f}"
    return task.labels[int(value)]


def write_predictions(path: str | Path, task: GlueTask, guids: Sequence[str], predictions: Sequence[float]) -> None:
    """`index<TAB>prediction` rows with a header, the GLUE server's submission format."""
    if len(guids) != len(predictions):
        raise ValueError(f"{path}: {len(guids)} ids but {len(predictions)} predictions")
    rows = [f"{g}\t{format_prediction(task, p)}" for g, p in zip(guids, predictions)]
    atomic_write(path, "\n".join(["index\tprediction", *rows]) + "\n")


def write_task_result(out_dir: str | Path, result: dict[str, Any]) -> Path:
    """Store one task's result (`status` "ok" with `runs`, or "absent" with `reason`), adding its summary. An
    "absent" result never replaces an "ok" one (data that could not be found this time must not erase results and
    their submission files): that keeps the old one, with a warning."""
    task = get_task(result["task"])
    if result["status"] == "ok":
        result = {**result, "summary": summarize_runs(task, result["runs"])}
    path = Path(out_dir) / task.name / RESULT_FILE
    if result["status"] == "absent" and path.is_file() and json.loads(path.read_text())["status"] == "ok":
        warnings.warn(f"{task.name} is absent ({result['reason']}); keeping its earlier result {path} (remove its "
                      "folder to record the task as absent)", stacklevel=2)
        return path
    write_json(path, result)
    return path


def summarize_runs(task: GlueTask, runs: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Per dev split and metric: median, mean, std, min, max over the seeds."""
    return {split: {key: summarize([r["dev"][split][key] for r in runs]) for key in METRIC_KEYS[task.metric]}
            for split in task.dev_splits}


def primary_score(task: GlueTask, run_or_summary: dict, statistic: str | None = None) -> float:
    """The table metric (first dev split, primary key) of one run, or a statistic of a task's summary."""
    split = task.dev_splits[0]
    if statistic is None:
        return run_or_summary["dev"][split][task.primary]
    return run_or_summary[split][task.primary][statistic]


def pretrain_pfs_days(model_path: str | Path) -> float | None:
    """Pretraining compute of a model: `pfs_days` of the last record of the nearest metrics.jsonl at or above
    the model directory (a pretraining output directory, or a checkpoint / export inside one). For a checkpoint
    directory named `step<N>` only records up to step N count."""
    path = Path(model_path).resolve()
    tag = TAG.match(path.name)
    last_step = int(tag.group(1)) if tag else None
    for folder in [path, *list(path.parents)[:3]]:
        if (folder / "metrics.jsonl").is_file():
            values = [r["pfs_days"] for r in MetricsFile(folder / "metrics.jsonl").records()
                      if "pfs_days" in r and (last_step is None or r.get("step", 0) <= last_step)]
            return float(values[-1]) if values else None
    return None


def load_results(out_dir: str | Path) -> dict[str, dict]:
    """Every task's result.json under `out_dir` (status "not_run" where there is none), in TASKS order."""
    results = {}
    for name in TASKS:
        path = Path(out_dir) / name / RESULT_FILE
        results[name] = json.loads(path.read_text()) if path.is_file() else {"task": name, "status": "not_run"}
    return results


def models_of(results: dict[str, dict]) -> dict[Path, list[str]]:
    """The models (`model_root`) that produced `results`, each with its tasks."""
    models: dict[Path, list[str]] = {}
    for name, result in results.items():
        if result.get("model_path"):
            models.setdefault(model_root(result["model_path"]), []).append(name)
    return models


def build_report(out_dir: str | Path, *, model_name: str | None = None,
                 pfs_days: float | None = None) -> dict[str, Any]:
    """Collect every task's result.json under `out_dir` into results.json, results.md and submission/."""
    out_dir = Path(out_dir)
    tasks = load_results(out_dir)
    done = [r for r in tasks.values() if r["status"] == "ok"]
    models = sorted(str(m) for m in models_of(tasks))
    model = model_name or next((r.get("model") for r in tasks.values() if r.get("model")), "model")
    if pfs_days is None:
        pfs_days = next((r["pretrain_pfs_days"] for r in done if r.get("pretrain_pfs_days") is not None), None)

    table = {name: (100 * primary_score(TASKS[name], tasks[name]["summary"], "median")
                    if tasks[name]["status"] == "ok" else None) for name in TABLE_TASKS}
    present = [v for v in table.values() if v is not None]
    avg = sum(present) / len(present) if present and len(models) < 2 else None  # no average across models
    report = {
        "model": model,
        "models": models,
        "tasks": tasks,
        "table": table,
        "avg": avg if len(present) == len(TABLE_TASKS) else None,
        "avg_present": avg,
        "avg_tasks": [n for n, v in table.items() if v is not None],
        "efficiency": efficiency(pfs_days, avg, len(present)),
        "submission": write_submission(out_dir, tasks),
    }
    write_json(out_dir / "results.json", report)
    atomic_write(out_dir / "results.md", render_markdown(report))
    return report


def efficiency(pfs_days: float | None, avg: float | None, tasks_present: int) -> dict[str, Any]:
    per_point = pfs_days / avg if pfs_days is not None and avg else None
    return {"pretrain_pfs_days": pfs_days, "avg": avg, "avg_tasks": tasks_present,
            "pfs_days_per_avg_point": per_point}


def best_seed(task: GlueTask, result: dict) -> int:
    """The seed with the best table metric on dev (ties: the first); the test submission uses its model."""
    return max(result["runs"], key=lambda r: primary_score(task, r))["seed"]


def write_submission(out_dir: Path, tasks: dict[str, dict]) -> dict[str, dict]:
    """Copy the test predictions each task's run wrote (its result's `test_files`), from its best-dev seed, to
    submission/<file>.tsv, and remove submission files no current result names; returns what was written."""
    written: dict[str, dict] = {}
    for name, result in tasks.items():
        if result["status"] != "ok":
            continue
        task = TASKS[name]
        seed = best_seed(task, result)
        for stem in result.get("test_files", []):
            target = out_dir / SUBMISSION_DIR / f"{stem}.tsv"
            with replacing(target) as tmp:
                shutil.copyfile(seed_dir(out_dir, task, seed) / f"{stem}.tsv", tmp)
            written[stem] = {"task": name, "seed": seed, "file": str(target.relative_to(out_dir))}
    for old in (out_dir / SUBMISSION_DIR).glob("*.tsv"):  # left by an earlier run of a task, e.g. with test files
        if old.stem not in written:
            old.unlink()
    return written


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
    tasks, table = report["tasks"], report["table"]
    lines = [f"# GLUE dev results: {report['model']}", "",
             "Median over seeds; CoLA MCC, STS-B Spearman, MNLI matched accuracy, the others accuracy (x100). "
             "AVG is over the 8 tasks without WNLI.", "",
             "| Model | " + " | ".join(TABLE_TASKS) + " | AVG |",
             "|---|" + "---:|" * (len(TABLE_TASKS) + 1)]
    cells = [_fmt(table[n]) if table[n] is not None else tasks[n]["status"].replace("_", " ") for n in TABLE_TASKS]
    if report["avg"] is not None:
        avg_cell = _fmt(report["avg"])
    elif report["avg_present"] is not None:
        avg_cell = f"{_fmt(report['avg_present'])}*"
    else:
        avg_cell = "-"
    lines.append(f"| {report['model']} | " + " | ".join(cells) + f" | {avg_cell} |")
    if len(report.get("models", [])) > 1:
        lines += ["", "**These results come from different models, so there is no AVG:** " +
                  ", ".join(f"`{m}`" for m in report["models"])]
    if report["avg"] is None and report["avg_present"] is not None:
        lines += ["", f"\\* AVG over the {len(report['avg_tasks'])} tasks present ({', '.join(report['avg_tasks'])}), "
                      "not comparable with a full 8-task AVG."]

    lines += ["", "## Per task (dev, over seeds, x100)", "",
              "| Task | Metric | Median | Mean | Std | Min | Max | Seeds |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in tasks.items():
        if result["status"] != "ok":
            continue
        for split, metrics in result["summary"].items():
            for key, s in metrics.items():
                lines.append(f"| {name}{SPLIT_NAMES[split]} | {METRIC_NAMES[key]} | {_fmt(100 * s['median'])} | "
                             f"{_fmt(100 * s['mean'])} | {_fmt(100 * s['std'])} | {_fmt(100 * s['min'])} | "
                             f"{_fmt(100 * s['max'])} | {s['n']} |")
    missing = [f"- {n}: {r['status'].replace('_', ' ')}" + (f" ({r['reason']})" if r.get("reason") else "")
               for n, r in tasks.items() if r["status"] != "ok"]
    if missing:
        lines += ["", "Tasks without results:", "", *missing]

    eff = report["efficiency"]
    lines += ["", "## Efficiency", ""]
    if eff["pretrain_pfs_days"] is None:
        lines.append("Pretraining compute unknown (no metrics.jsonl with pfs_days at or above the model directory; "
                     "pass --pretrain_pfs_days).")
    else:
        n_all = len(TABLE_TASKS)
        avg_note = "" if eff["avg_tasks"] == n_all else f" over {eff['avg_tasks']} of {n_all} tasks"
        lines += ["| Model | pretraining pfs-days | GLUE dev AVG | pfs-days per AVG point |", "|---|---:|---:|---:|",
                  f"| {report['model']} | {eff['pretrain_pfs_days']:.4g} | {_fmt(eff['avg'])}{avg_note} | "
                  f"{'-' if eff['pfs_days_per_avg_point'] is None else format(eff['pfs_days_per_avg_point'], '.3g')} |"]

    if report["submission"]:
        lines += ["", "## Test submission", "",
                  f"GLUE server files in `{SUBMISSION_DIR}/` (each from its task's best-dev seed):", ""]
        lines += [f"- {stem}.tsv: {w['task']} seed {w['seed']}" for stem, w in sorted(report["submission"].items())]
    return "\n".join(lines) + "\n"


__all__ = ["RESULT_FILE", "RUN_FILE", "SUBMISSION_DIR", "write_json", "seed_dir", "model_root", "display_name",
           "load_results", "models_of", "format_prediction",
           "write_predictions", "write_task_result", "summarize_runs", "primary_score", "pretrain_pfs_days",
           "build_report", "efficiency", "best_seed", "write_submission", "render_markdown"]
