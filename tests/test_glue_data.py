"""GLUE readers: every task on made files in the original layout (with its quirks), errors, HF mapping,
and the real files' row counts when ../shared/data is present."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from electra_ds.data import glue
from electra_ds.data.glue import (DIAGNOSTIC, TASKS, GlueDataError, MissingData, check_glue_dir, get_task, load_split,
                                  read_tsv)

REAL_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def _write(path: Path, rows: list[str], *, bom: bool = False, final_newline: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(rows) + ("\n" if final_newline else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


def make_glue_dir(root: Path) -> Path:
    """Two or three rows per split of every task, in the layout download_glue_data.py writes."""
    g = root / "glue"
    # CoLA: no header on train/dev; dev has no final newline.
    _write(g / "CoLA/train.tsv", ["gj04\t1\t\tThe sailors rode the breeze.", "gj04\t0\t*\tThe the ran dog."])
    _write(g / "CoLA/dev.tsv", ["cj99\t1\t\tBill left.", "cj99\t0\t*\tLeft Bill the."], final_newline=False)
    _write(g / "CoLA/test.tsv", ["index\tsentence", "0\tBill whistled.", "1\tThe car honked."])
    _write(g / "SST-2/train.tsv", ["sentence\tlabel", "a charming journey \t1", "bleak and desperate \t0"])
    _write(g / "SST-2/dev.tsv", ["sentence\tlabel", "it 's good \t1"])
    _write(g / "SST-2/test.tsv", ["index\tsentence", "0\tuneasy mishmash .", "1\tfine ."])
    # MRPC: byte-order mark on train/dev; a second sentence with a stray quote.
    mrpc_header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    _write(g / "MRPC/train.tsv", [mrpc_header, '1\t1\t2\tHe said "hi".\t"He said hi.', "0\t3\t4\tA b.\tC d."],
           bom=True)
    _write(g / "MRPC/dev.tsv", [mrpc_header, "1\t5\t6\tE f.\tE f g."], bom=True)
    _write(g / "MRPC/test.tsv", ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t7\t8\tX y.\tX z."])
    sts_cols = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    _write(g / "STS-B/train.tsv", [sts_cols + "\tscore",
                                   "0\tmain\tMSRvid\t2012\t0001\tnone\tnone\tA plane.\tA jet.\t5.000",
                                   "1\tmain\tMSRvid\t2012\t0004\tnone\tnone\tA man.\tA cat.\t0.400"])
    _write(g / "STS-B/dev.tsv", [sts_cols + "\tscore", "0\tmain\tMSRvid\t2012\t0000\tnone\tnone\tA b.\tA c.\t3.800"])
    _write(g / "STS-B/test.tsv", [sts_cols, "0\tmain\tMSRvid\t2012\t0024\tnone\tnone\tA girl.\tA boy."])
    qqp_cols = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    _write(g / "QQP/train.tsv", [qqp_cols, "0\t1\t2\tHow?\tWhy?\t0", "1\t3\t4\tWhat is it?\tWhat's it?\t1"])
    _write(g / "QQP/dev.tsv", [qqp_cols, "9\t5\t6\tWho?\tWho is?\t1"])
    _write(g / "QQP/test.tsv", ["id\tquestion1\tquestion2", "0\tWhen?\tWhere?"])
    mnli_cols = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
                 "sentence2_parse\tsentence1\tsentence2")
    parse = "( a )\t( b )\t(ROOT a)\t(ROOT b)"
    _write(g / "MNLI/train.tsv", [mnli_cols + "\tlabel1\tgold_label",
                                  f"0\t1\t1e\tgov\t{parse}\tThe cat sat.\tA cat sat.\tentailment\tentailment",
                                  f"1\t2\t2n\tgov\t{parse}\tThe cat sat.\tA dog sat.\tcontradiction\tcontradiction"])
    dev_cols = mnli_cols + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    _write(g / "MNLI/dev_matched.tsv", [dev_cols, f"0\t3\t3n\tfic\t{parse}\tHe ran.\tHe moved.\t" + "neutral\t" * 5
                                        + "neutral"])
    _write(g / "MNLI/dev_mismatched.tsv", [dev_cols, f"0\t4\t4c\tlet\t{parse}\tShe ate.\tShe fasted.\t"
                                           + "contradiction\t" * 5 + "contradiction"])
    _write(g / "MNLI/test_matched.tsv", [mnli_cols, f"0\t5\t5\tfic\t{parse}\tIt rained.\tIt was wet."])
    _write(g / "MNLI/test_mismatched.tsv", [mnli_cols, f"0\t6\t6\tlet\t{parse}\tIt snowed.\tIt was hot."])
    # QNLI dev / RTE train: a row that starts with a stray quote (quoting must be off).
    _write(g / "QNLI/train.tsv", ["index\tquestion\tsentence\tlabel", "0\tWho?\tHe did.\tentailment"])
    _write(g / "QNLI/dev.tsv", ["index\tquestion\tsentence\tlabel", '0\t"Who is\tHe is.\tnot_entailment',
                                "1\tWhat?\tIt is.\tentailment"])
    _write(g / "QNLI/test.tsv", ["index\tquestion\tsentence", "0\tWhy?\tBecause."])
    pair_cols = "index\tsentence1\tsentence2"
    _write(g / "RTE/train.tsv", [pair_cols + "\tlabel", '0\t"Quoted start.\tNo end quote.\tnot_entailment',
                                 "1\tA dog barks.\tAn animal barks.\tentailment"])
    _write(g / "RTE/dev.tsv", [pair_cols + "\tlabel", "0\tX is Y.\tY is X.\tentailment"])
    _write(g / "RTE/test.tsv", [pair_cols, "0\tP.\tQ.", "1\tR.\tS."])
    _write(g / "WNLI/train.tsv", [pair_cols + "\tlabel", "0\tI stuck a pin.\tThe pin stuck.\t1"])
    _write(g / "WNLI/dev.tsv", [pair_cols + "\tlabel", "0\tThe drain is clogged.\tIt is clean.\t0"])
    _write(g / "WNLI/test.tsv", [pair_cols, "0\tMaude ran.\tDora ran."])
    _write(g / "diagnostic/diagnostic.tsv", [pair_cols, "0\tThe cat sat.\tThe cat did not sit.",
                                             "1\tThe cat did not sit.\tThe cat sat."])
    return g


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return make_glue_dir(tmp_path_factory.mktemp("made"))


def test_every_task_reads_its_layout(glue_dir):
    sizes = {  # the rows make_glue_dir writes (CoLA's train/dev files have no header)
        "CoLA": (2, 2, 2), "SST-2": (2, 1, 2), "MRPC": (2, 1, 1), "STS-B": (2, 1, 1), "QQP": (2, 1, 1),
        "MNLI": (2, 1, 1, 1, 1), "QNLI": (1, 2, 1), "RTE": (2, 1, 2), "WNLI": (1, 1, 1), "AX": (2,)}
    for task in [*TASKS.values(), DIAGNOSTIC]:
        assert len(task.splits) == len(sizes[task.name]), task.name
        for split, size in zip(task.splits, sizes[task.name]):
            rows = load_split(task, split, glue_dir)
            assert len(rows) == size, (task.name, split)
            for r in rows:
                assert r.text_a and (r.text_b is None) == (task.hf_text[1] is None), (task.name, split, r)
                if split in task.test_splits:
                    assert r.label is None
                elif task.is_regression:
                    assert isinstance(r.label, float)
                else:
                    assert 0 <= r.label < task.num_labels


def test_quirks(glue_dir):
    cola = load_split(TASKS["CoLA"], "train", glue_dir)  # no header: the first line is data
    assert [(r.text_a, r.label) for r in cola] == [("The sailors rode the breeze.", 1), ("The the ran dog.", 0)]
    cola_dev = load_split(TASKS["CoLA"], "dev", glue_dir)  # no final newline
    assert cola_dev[-1].text_a == "Left Bill the." and len(cola_dev) == 2
    mrpc = load_split(TASKS["MRPC"], "train", glue_dir)  # the BOM does not hide the "Quality" column
    assert mrpc[0] == glue.GlueExample("0", 'He said "hi".', '"He said hi.', 1)
    rte = load_split(TASKS["RTE"], "train", glue_dir)  # a stray quote stays text, rows stay separate
    assert [r.text_a for r in rte] == ['"Quoted start.', "A dog barks."]
    assert [r.label for r in rte] == [1, 0]
    qnli = load_split(TASKS["QNLI"], "dev", glue_dir)
    assert qnli[0].text_a == '"Who is' and qnli[0].label == TASKS["QNLI"].labels.index("not_entailment")
    mnli = TASKS["MNLI"]
    assert [r.label for r in load_split(mnli, "train", glue_dir)] == [0, 2]  # entailment, contradiction
    assert load_split(mnli, "dev_matched", glue_dir)[0].label == mnli.labels.index("neutral")
    assert load_split(TASKS["STS-B"], "train", glue_dir)[1].label == pytest.approx(0.4)
    assert [r.guid for r in load_split(TASKS["RTE"], "test", glue_dir)] == ["0", "1"]
    assert load_split(TASKS["QQP"], "test", glue_dir)[0].guid == "0"  # QQP's index column is "id"
    assert load_split(DIAGNOSTIC, "test", glue_dir)[1].text_b == "The cat sat."


def test_task_registry():
    assert get_task("sst2") is TASKS["SST-2"] and get_task("STS-B") is get_task("stsb") is TASKS["STS-B"]
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")
    assert get_task("MNLI").test_splits == {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}
    assert get_task("ax") is DIAGNOSTIC and not DIAGNOSTIC.trainable
    assert {t.name: t.epochs for t in TASKS.values() if t.epochs != 3} == {"STS-B": 10, "RTE": 10}
    assert TASKS["STS-B"].is_regression and TASKS["STS-B"].num_labels == 1
    with pytest.raises(ValueError, match="unknown GLUE task 'SQuAD'"):
        get_task("SQuAD")
    with pytest.raises(ValueError, match="no split 'dev'"):
        load_split(TASKS["MNLI"], "dev", "/nonexistent")


def test_bad_rows_name_file_and_line(tmp_path):
    rte = TASKS["RTE"]
    path = tmp_path / "RTE" / "train.tsv"
    _write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb"])
    with pytest.raises(GlueDataError, match=r"RTE/train.tsv:3: expected 4 tab-separated columns, found 3"):
        read_tsv(rte, "train", path)
    _write(path, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\ta\tb\tmaybe"])
    with pytest.raises(GlueDataError, match=r"train.tsv:3: unknown RTE label 'maybe'"):
        read_tsv(rte, "train", path)
    _write(path, ["index\tsentence1\tlabel", "0\ta\tentailment"])
    with pytest.raises(GlueDataError, match=r"train.tsv:1: header has no column 'sentence2'"):
        read_tsv(rte, "train", path)
    cola = tmp_path / "CoLA" / "train.tsv"
    _write(cola, ["gj04\t1\t\tFine.", "gj04\t1\tNo sentence"])
    with pytest.raises(GlueDataError, match=r"CoLA/train.tsv:2: expected 4"):
        read_tsv(TASKS["CoLA"], "train", cola)
    sts = tmp_path / "STS-B" / "dev.tsv"
    _write(sts, ["index\tsentence1\tsentence2\tscore", "0\ta\tb\tfive"])
    with pytest.raises(GlueDataError, match=r"dev.tsv:2: STS-B score 'five' is not a number"):
        read_tsv(TASKS["STS-B"], "dev", sts)
    with pytest.raises(MissingData, match="QQP train"):
        load_split(TASKS["QQP"], "train", tmp_path)


def test_ids_are_the_index_column_or_the_row_number(glue_dir, tmp_path):
    """As Hugging Face's idx: dev predictions must not depend on the data source (nor start at line 2)."""
    ids = {(name, split): [r.guid for r in load_split(TASKS[name], split, glue_dir)] for name, split in
           [("CoLA", "dev"), ("SST-2", "train"), ("MRPC", "train"), ("QQP", "dev"), ("QNLI", "dev"),
            ("MNLI", "dev_matched")]}
    assert ids == {("CoLA", "dev"): ["0", "1"], ("SST-2", "train"): ["0", "1"], ("MRPC", "train"): ["0", "1"],
                   ("QQP", "dev"): ["9"], ("QNLI", "dev"): ["0", "1"], ("MNLI", "dev_matched"): ["0"]}
    _write(tmp_path / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "5\ta\tb\tentailment",
                                          "7\tc\td\tentailment"])
    assert [r.guid for r in load_split(TASKS["RTE"], "dev", tmp_path)] == ["5", "7"]  # the file's own column


def test_glue_dir_that_does_not_exist_is_an_error(tmp_path):
    """A mistyped GLUE_DIR must fail, not make every task absent; a task missing from a real one is absent."""
    for glue_dir, message in ((tmp_path / "glu", "does not exist"), (tmp_path, "holds none of the task folders")):
        for load in (lambda: check_glue_dir(glue_dir), lambda: load_split(TASKS["QQP"], "train", glue_dir)):
            with pytest.raises(FileNotFoundError, match=f"GLUE directory {glue_dir} {message}.*--glue_dir") as failed:
                load()
            assert not isinstance(failed.value, MissingData)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(MissingData, match="QQP train: no file"):
        load_split(TASKS["QQP"], "train", tmp_path)


def test_hugging_face_rows_map_to_examples(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        if config == "qqp":
            raise ConnectionError("offline")
        return [{"premise": "P.", "hypothesis": "H.", "label": 2, "idx": 7}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_split(TASKS["MNLI"], "dev_mismatched")
    assert rows == [glue.GlueExample("7", "P.", "H.", 2)]
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    with pytest.raises(GlueDataError, match="could not load nyu-mll/glue/qqp split train") as failed:
        load_split(TASKS["QQP"], "train")
    assert not isinstance(failed.value, MissingData)  # offline is an error, never "absent"


def test_hugging_face_without_datasets_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(GlueDataError, match="pip install datasets.*--glue_dir"):
        load_split(TASKS["RTE"], "train")


REAL_SIZES = {("CoLA", "train"): 8551, ("CoLA", "dev"): 1043, ("CoLA", "test"): 1063, ("SST-2", "train"): 67349,
              ("SST-2", "dev"): 872, ("SST-2", "test"): 1821, ("MRPC", "train"): 3668, ("MRPC", "dev"): 408,
              ("MRPC", "test"): 1725, ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500, ("STS-B", "test"): 1379,
              ("QNLI", "dev"): 5463, ("QNLI", "test"): 5463, ("RTE", "train"): 2490, ("RTE", "dev"): 277,
              ("RTE", "test"): 3000, ("WNLI", "train"): 635, ("WNLI", "dev"): 71, ("WNLI", "test"): 146}


@pytest.mark.skipif(not REAL_GLUE.is_dir(), reason="no ../shared/data/glue")
def test_real_files_have_the_official_sizes():
    for (name, split), size in REAL_SIZES.items():
        assert len(load_split(TASKS[name], split, REAL_GLUE)) == size, (name, split)
    assert len(load_split(DIAGNOSTIC, "test", REAL_GLUE)) == 1104
    with pytest.raises(MissingData):
        load_split(TASKS["QNLI"], "train", REAL_GLUE)
