"""GLUE task registry and readers.

Two sources give the same `GlueExample` lists: the original GLUE TSV layout (as written by
`download_glue_data.py`: `<glue_dir>/<TASK>/{train,dev,test}.tsv`, MNLI's `dev_matched` / `dev_mismatched` /
`test_matched` / `test_mismatched`, the diagnostic set in `diagnostic/diagnostic.tsv`) and Hugging Face
`datasets` (`nyu-mll/glue`). TSVs are read with quoting off (a row may start with a stray `"`), a byte-order
mark is dropped, and CoLA's train/dev files have no header. Every malformed row is an error naming the file
and line. Only a task whose files are absent from an existing GLUE directory raises `MissingData` (callers report
it as absent); a GLUE directory that does not exist, or a failure to load from Hugging Face, is an error.
Example ids (`guid`) are the file's index/id column where it has one, else the 0-based row number (Hugging
Face's `idx`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

HF_DATASET = "nyu-mll/glue"

Column = str | int  # a header name, or a 0-based position in a file without a header


class GlueDataError(ValueError):
    """GLUE data that cannot be read: a file not in its task's layout (the message names file and line), or a
    failure to load from Hugging Face."""


class MissingData(FileNotFoundError):
    """A task/split has no file in the GLUE directory: the task is absent there."""


class GlueExample(NamedTuple):
    guid: str                    # the file's index/id column where it has one, else the 0-based row number
    text_a: str
    text_b: str | None
    label: int | float | None    # class index into `GlueTask.labels`, a float score (STS-B), None on test


@dataclass(frozen=True)
class Columns:
    """Where the fields of one split's rows are."""

    text_a: Column
    text_b: Column | None
    label: Column | None = None
    index: Column | None = None
    header: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str                     # GLUE's spelling: CoLA, SST-2, ...
    hf_config: str                # nyu-mll/glue configuration name
    labels: tuple[str, ...]       # label names as in the TSVs, in Hugging Face's class order; () = regression
    metric: str                   # "mcc" | "accuracy" | "accuracy_f1" | "correlation" (glue_metrics)
    primary: str                  # the metric key shown in the results table
    epochs: int                   # the ELECTRA recipe's default
    labelled: Columns             # train / dev layout
    test: Columns                 # test layout
    hf_text: tuple[str, str | None]
    dev_splits: tuple[str, ...] = ("dev",)
    test_splits: dict[str, str] = field(default_factory=dict)  # split -> GLUE server file stem
    directory: str = ""           # folder under glue_dir (defaults to `name`)
    trainable: bool = True        # False for the test-only diagnostic set
    unordered: bool = False       # the pair's order carries no meaning (ELECTRA trains on both orders)
    score_max: float = 1.0        # regression scores run 0..score_max; training targets are divided by it

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    @property
    def folder(self) -> str:
        return self.directory or self.name

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) * self.trainable + self.dev_splits + tuple(self.test_splits)


def _pair(a: str, b: str, label: str | None = "label", index: str | None = "index",
          labelled_index: bool = True) -> tuple[Columns, Columns]:
    """(train/dev, test) layouts; `labelled_index`: train/dev have the index column too (not MRPC's)."""
    return Columns(a, b, label, index if labelled_index else None), Columns(a, b, None, index)


_HF_SPLITS = {"dev": "validation", "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}

TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("CoLA", "cola", ("0", "1"), "mcc", "mcc", 3,
             labelled=Columns(3, None, 1, None, header=False), test=Columns("sentence", None, None, "index"),
             hf_text=("sentence", None), test_splits={"test": "CoLA"}),
    GlueTask("SST-2", "sst2", ("0", "1"), "accuracy", "accuracy", 3,
             labelled=Columns("sentence", None, "label"), test=Columns("sentence", None, None, "index"),
             hf_text=("sentence", None), test_splits={"test": "SST-2"}),
    GlueTask("MRPC", "mrpc", ("0", "1"), "accuracy_f1", "accuracy", 3,
             *_pair("#1 String", "#2 String", label="Quality", labelled_index=False),
             hf_text=("sentence1", "sentence2"), test_splits={"test": "MRPC"}, unordered=True),
    GlueTask("STS-B", "stsb", (), "correlation", "spearman", 10,
             *_pair("sentence1", "sentence2", label="score"),
             hf_text=("sentence1", "sentence2"), test_splits={"test": "STS-B"}, unordered=True, score_max=5.0),
    GlueTask("QQP", "qqp", ("0", "1"), "accuracy_f1", "accuracy", 3,
             *_pair("question1", "question2", label="is_duplicate", index="id"),
             hf_text=("question1", "question2"), test_splits={"test": "QQP"}),
    GlueTask("MNLI", "mnli", ("entailment", "neutral", "contradiction"), "accuracy", "accuracy", 3,
             *_pair("sentence1", "sentence2", label="gold_label"),
             hf_text=("premise", "hypothesis"), dev_splits=("dev_matched", "dev_mismatched"),
             test_splits={"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}),
    GlueTask("QNLI", "qnli", ("entailment", "not_entailment"), "accuracy", "accuracy", 3,
             *_pair("question", "sentence"), hf_text=("question", "sentence"), test_splits={"test": "QNLI"}),
    GlueTask("RTE", "rte", ("entailment", "not_entailment"), "accuracy", "accuracy", 10,
             *_pair("sentence1", "sentence2"), hf_text=("sentence1", "sentence2"), test_splits={"test": "RTE"}),
    GlueTask("WNLI", "wnli", ("0", "1"), "accuracy", "accuracy", 3,
             *_pair("sentence1", "sentence2"), hf_text=("sentence1", "sentence2"), test_splits={"test": "WNLI"}),
]}

# The diagnostic set: test-only, scored on the GLUE server with the MNLI model's predictions.
DIAGNOSTIC = GlueTask("AX", "ax", TASKS["MNLI"].labels, "accuracy", "accuracy", 0,
                      labelled=Columns("sentence1", "sentence2", None, "index"),
                      test=Columns("sentence1", "sentence2", None, "index"),
                      hf_text=("premise", "hypothesis"), dev_splits=(), test_splits={"test": "AX"},
                      directory="diagnostic", trainable=False)

# The results table's columns (the seeds' layout); AVG is over these 8 (WNLI excluded).
TABLE_TASKS: tuple[str, ...] = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE")

_ALIASES = {name.lower().replace("-", ""): name for name in TASKS}  # also the Hugging Face configs' names
_ALIASES.update({"sts": "STS-B", "sst": "SST-2"})


def get_task(name: str) -> GlueTask:
    """The task called `name` (GLUE or Hugging Face spelling, any case: `SST-2`, `sst2`, `sts-b`)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key in ("ax", "diagnostic"):
        return DIAGNOSTIC
    if key not in _ALIASES:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[_ALIASES[key]]


def split_path(task: GlueTask, split: str, glue_dir: str | Path) -> Path:
    """The TSV of `split` in the original GLUE layout."""
    _check_split(task, split)
    stem = "diagnostic" if task is DIAGNOSTIC else split
    return Path(glue_dir) / task.folder / f"{stem}.tsv"


def load_split(task: GlueTask, split: str, glue_dir: str | Path | None = None) -> list[GlueExample]:
    """Examples of `split` from `glue_dir` (original TSV layout; `check_glue_dir` first) or, when None, from Hugging
    Face datasets."""
    if glue_dir is not None:
        path = split_path(task, split, glue_dir)  # an unknown split is refused first
        check_glue_dir(glue_dir)
        return read_tsv(task, split, path)
    return read_hf(task, split)


def check_glue_dir(glue_dir: str | Path) -> None:
    """Raise FileNotFoundError unless `glue_dir` is a directory holding at least one task folder: a mistyped path
    must not make every task absent."""
    glue_dir = Path(glue_dir)
    where = "check --glue_dir (GLUE_DIR for glue.sh), or leave it out to read Hugging Face datasets"
    if not glue_dir.is_dir():
        raise FileNotFoundError(f"GLUE directory {glue_dir} does not exist; {where}")
    if not any((glue_dir / task.folder).is_dir() for task in [*TASKS.values(), DIAGNOSTIC]):
        raise FileNotFoundError(f"GLUE directory {glue_dir} holds none of the task folders "
                                f"({', '.join(TASKS)}, {DIAGNOSTIC.folder}); {where}")


def read_tsv(task: GlueTask, split: str, path: str | Path) -> list[GlueExample]:
    """Read one GLUE TSV; quoting off, BOM dropped, every row checked (errors name the file and line)."""
    _check_split(task, split)
    path = Path(path)
    if not path.is_file():
        raise MissingData(f"{task.name} {split}: no file {path}")
    columns = task.test if split in task.test_splits else task.labelled
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if lines and lines[-1] == "":
        lines.pop()
    first = 1  # the line number of the first row
    if columns.header:
        if not lines:
            raise GlueDataError(f"{path}: empty file, expected a header line")
        header = lines[0].split("\t")
        positions = _positions(columns, header, path)
        width, first = len(header), 2
        lines = lines[1:]
    else:
        positions = {k: v for k, v in _fields(columns).items() if v is not None}
        width = max(positions.values()) + 1
    examples = []
    for row_no, line in enumerate(lines):
        line_no = row_no + first
        row = line.split("\t")
        if len(row) != width:
            raise GlueDataError(f"{path}:{line_no}: expected {width} tab-separated columns, found {len(row)} "
                                f"(a missing or extra column; the file must be in the original GLUE layout)")
        examples.append(GlueExample(
            guid=row[positions["index"]] if "index" in positions else str(row_no),
            text_a=row[positions["text_a"]],
            text_b=row[positions["text_b"]] if "text_b" in positions else None,
            label=_parse_label(task, row[positions["label"]], f"{path}:{line_no}") if "label" in positions
            else None))
    return examples


def read_hf(task: GlueTask, split: str) -> list[GlueExample]:
    """Examples of `split` from Hugging Face `datasets` (`nyu-mll/glue`); needs internet or a local HF cache."""
    _check_split(task, split)
    try:
        import datasets  # optional dependency (extras "hub")
    except ImportError:
        raise GlueDataError(f"{task.name} {split}: reading GLUE from Hugging Face needs `pip install datasets`; or "
                            "pass --glue_dir (GLUE_DIR for glue.sh) with the TSV files") from None

    hf_split = _HF_SPLITS.get(split, split)
    try:
        data = datasets.load_dataset(HF_DATASET, task.hf_config, split=hf_split)
    except Exception as exc:  # noqa: BLE001 - every task is on the hub: a failure is an error, never "absent"
        raise GlueDataError(f"{task.name} {split}: could not load {HF_DATASET}/{task.hf_config} split {hf_split} "
                            f"from Hugging Face ({type(exc).__name__}: {exc}); check the network or the HF cache, "
                            "or pass --glue_dir (GLUE_DIR for glue.sh) for local TSVs") from exc
    a_key, b_key = task.hf_text
    labelled = split not in task.test_splits
    examples = []
    for row in data:
        label = None
        if labelled:
            label = float(row["label"]) if task.is_regression else int(row["label"])
            if not task.is_regression and not 0 <= label < task.num_labels:
                raise GlueDataError(f"{HF_DATASET}/{task.hf_config} {hf_split} idx {row['idx']}: label {label} "
                                    f"outside 0..{task.num_labels - 1}")
        examples.append(GlueExample(str(row["idx"]), row[a_key], row[b_key] if b_key else None, label))
    return examples


def _check_split(task: GlueTask, split: str) -> None:
    if split not in task.splits:
        raise ValueError(f"{task.name} has no split {split!r}; its splits are {', '.join(task.splits)}")


def _fields(columns: Columns) -> dict[str, Column | None]:
    return {"text_a": columns.text_a, "text_b": columns.text_b, "label": columns.label, "index": columns.index}


def _positions(columns: Columns, header: list[str], path: Path) -> dict[str, int]:
    positions = {}
    for key, name in _fields(columns).items():
        if name is None:
            continue
        if name not in header:
            raise GlueDataError(f"{path}:1: header has no column {name!r} (found {header}); "
                                f"the file must be in the original GLUE layout")
        positions[key] = header.index(name)
    return positions


def _parse_label(task: GlueTask, value: str, where: str) -> int | float:
    if task.is_regression:
        try:
            return float(value)
        except ValueError:
            raise GlueDataError(f"{where}: {task.name} score {value!r} is not a number") from None
    try:
        return task.labels.index(value)
    except ValueError:
        raise GlueDataError(f"{where}: unknown {task.name} label {value!r} (expected one of "
                            f"{', '.join(task.labels)})") from None


__all__ = ["GlueTask", "GlueExample", "Columns", "GlueDataError", "MissingData", "TASKS", "DIAGNOSTIC",
           "TABLE_TASKS", "HF_DATASET", "get_task", "split_path", "load_split", "check_glue_dir", "read_tsv", "read_hf"]
