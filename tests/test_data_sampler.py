"""Segment sampler: windows move, stay in their document, are framed right, and depend only on (seed, step, rank).

The corpus is made of unique words w0, w1, ... (one vocabulary entry each), laid out in order, so token id
``5 + i`` is word ``i`` and a window's ids tell exactly where it comes from.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from electra_ds.data.cache import CacheError, TokenCache, build_cache
from electra_ds.data.sampler import SegmentSampler, batches
from process_helpers import ended_within, needs_pidfd, running

DOC_LENGTHS = [3, 10, 40, 200, 700]
FIRST_WORD_ID = 5  # after [PAD] [UNK] [CLS] [SEP] [MASK]
PAD, CLS, SEP = 0, 2, 3


@pytest.fixture(scope="module")
def data_word_corpus(tmp_path_factory) -> tuple[Path, Path]:
    """(source folder, tokenizer vocab.txt): document k holds the next DOC_LENGTHS[k] words."""
    root = tmp_path_factory.mktemp("words")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                               + [f"w{i}" for i in range(sum(DOC_LENGTHS))]) + "\n")
    src = root / "src"
    src.mkdir()
    word = 0
    for k, n in enumerate(DOC_LENGTHS):
        words = [f"w{i}" for i in range(word, word + n)]
        (src / f"doc{k}.txt").write_text("\n".join(" ".join(words[i:i + 9]) for i in range(0, n, 9)))
        word += n
    return src, vocab


def _cache(corpus, tmp_path_factory, **kw) -> TokenCache:
    src, vocab = corpus
    out = build_cache(src, tmp_path_factory.mktemp("cache") / "c", vocab, workers=1, heldout_fraction=0,
                      progress=False, **kw)
    return TokenCache(out)


@pytest.fixture(scope="module")
def data_word_cache(data_word_corpus, tmp_path_factory) -> TokenCache:
    return _cache(data_word_corpus, tmp_path_factory)


@pytest.fixture(scope="module")
def data_word_cache_sharded(data_word_corpus, tmp_path_factory) -> TokenCache:
    cache = _cache(data_word_corpus, tmp_path_factory, shard_tokens=64)
    assert len(cache.shards) > 10
    return cache


def _doc_bounds() -> np.ndarray:
    return FIRST_WORD_ID + np.concatenate(([0], np.cumsum(DOC_LENGTHS)))


def _rows(batch: dict) -> list[np.ndarray]:
    """The text tokens (between [CLS] and the final [SEP]) of each row."""
    return [ids[1:int(mask.sum()) - 1] for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


@pytest.mark.parametrize("sharded", [False, True])
def test_windows_move_cover_documents_and_never_cross(data_word_cache, data_word_cache_sharded, sharded):
    cache = data_word_cache_sharded if sharded else data_word_cache
    max_length, window = 34, 32
    sampler = SegmentSampler(cache, max_length, 64, seed=0)
    bounds = _doc_bounds()
    starts: dict[int, set] = {k: set() for k in range(len(DOC_LENGTHS))}
    for step in range(150):
        batch = sampler.batch(step)
        for ids, mask, tokens in zip(batch["input_ids"], batch["attention_mask"], _rows(batch)):
            n = len(tokens)
            assert ids[0] == CLS and ids[n + 1] == SEP and np.all(ids[n + 2:] == PAD)
            assert np.all(mask[:n + 2] == 1) and np.all(mask[n + 2:] == 0)
            assert np.all(np.diff(tokens) == 1)  # contiguous text
            doc = int(np.searchsorted(bounds, tokens[0], side="right") - 1)
            assert tokens[-1] < bounds[doc + 1]  # never crosses into the next document
            if sharded:  # shard ends cut documents: the window stays in its part
                assert n <= window
            else:
                assert n == min(window, DOC_LENGTHS[doc])
            starts[doc].add(int(tokens[0] - bounds[doc]))
        assert np.all(batch["token_type_ids"] == 0)
    if not sharded:
        # every start position of every document was drawn: the windows move
        for doc, length in enumerate(DOC_LENGTHS):
            assert starts[doc] == set(range(max(length - window, 0) + 1)), doc


def test_documents_drawn_in_proportion_to_length(data_word_cache):
    sampler = SegmentSampler(data_word_cache, 16, 256, seed=5)
    bounds = _doc_bounds()
    first = np.concatenate([sampler.batch(s)["input_ids"][:, 1] for s in range(40)])
    counts = np.bincount(np.searchsorted(bounds, first, side="right") - 1, minlength=len(DOC_LENGTHS))
    expected = np.array(DOC_LENGTHS) / sum(DOC_LENGTHS) * len(first)
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 3)


def test_short_document_gives_padded_row(data_word_cache):
    sampler = SegmentSampler(data_word_cache, 64, 256, seed=1)
    for step in range(50):  # document 0 (3 words) is drawn with probability 3 / 953
        batch = sampler.batch(step)
        short = np.flatnonzero(batch["input_ids"][:, 1] == FIRST_WORD_ID)
        if len(short):
            break
    row = batch["input_ids"][short[0]]
    assert row[:5].tolist() == [CLS, 5, 6, 7, SEP] and np.all(row[5:] == PAD)
    assert batch["attention_mask"][short[0]].sum() == 5


def test_deterministic_by_seed_step_rank(data_word_cache):
    def make(**kw):
        return SegmentSampler(data_word_cache, 20, 8, **{"seed": 3, **kw})

    a, b = make().batch(17), make().batch(17)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(v.dtype == np.int64 and v.shape == (8, 20) for v in a.values())
    assert not np.array_equal(a["input_ids"], make().batch(18)["input_ids"])
    assert not np.array_equal(a["input_ids"], make(seed=4).batch(17)["input_ids"])
    # ranks split one global batch: equal sizes, disjoint draws, independent of the order of calls
    whole = SegmentSampler(data_word_cache, 20, 24, seed=3).batch(17)["input_ids"]
    parts = [make(rank=r, world_size=3).batch(17)["input_ids"] for r in (2, 0, 1)]
    assert all(p.shape == (8, 20) for p in parts)
    assert np.array_equal(np.concatenate([parts[1], parts[2], parts[0]]), whole)


def test_two_segments_layout(data_word_cache):
    max_length = 40
    sampler = SegmentSampler(data_word_cache, max_length, 256, seed=2, two_segments=True)
    singles = total = 0
    for step in range(8):
        batch = sampler.batch(step)
        for ids, mask, types in zip(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]):
            end = int(mask.sum()) - 1
            seps = np.flatnonzero(ids[:end + 1] == SEP)
            assert ids[0] == CLS and seps[-1] == end and np.all(ids[end + 1:] == PAD)
            text = np.delete(ids[1:end + 1], seps - 1)
            assert np.all(np.diff(text) == 1)  # A and B are consecutive text of one document
            total += 1
            if len(seps) == 1:
                singles += 1
                assert np.all(types == 0)
                continue
            k, m = seps[0] - 1, len(text)
            assert len(seps) == 2 and m <= max_length - 3 and 1 <= k <= m - 1
            assert np.all(types[:k + 2] == 0) and np.all(types[k + 2:end + 1] == 1) and np.all(types[end + 1:] == 0)
            if m >= 8:
                assert 0.2 * m <= k <= 0.8 * m
    assert 0.05 < singles / total < 0.2  # about 10% single segments (plus 1-2 token documents)


def test_two_segment_windows_reach_document_ends(data_word_cache):
    """A two-segment row holds one text token fewer: its start is drawn for that width, so a document's last token
    is drawn as often as its first (not only by the 10% single-segment rows)."""
    max_length, width = 40, 37
    sampler = SegmentSampler(data_word_cache, max_length, 256, seed=6, two_segments=True)
    counts = np.zeros(FIRST_WORD_ID + sum(DOC_LENGTHS), dtype=np.int64)
    for step in range(40):
        batch = sampler.batch(step)
        ids = batch["input_ids"][(batch["input_ids"] == SEP).sum(axis=1) == 2]  # two-segment rows
        counts += np.bincount(ids[ids >= FIRST_WORD_ID], minlength=len(counts))
    bounds = _doc_bounds()
    long_docs = [doc for doc, length in enumerate(DOC_LENGTHS) if length >= width]
    first, last = counts[bounds[long_docs]], counts[bounds[np.add(long_docs, 1)] - 1]
    assert np.all(last > 0) and first.sum() > 100 and 0.7 < last.sum() / first.sum() < 1.4, (first, last)


def test_packed_windows_span_documents_not_shards(data_word_cache, data_word_cache_sharded):
    window = 30
    crossed = 0
    for cache in (data_word_cache, data_word_cache_sharded):
        sampler = SegmentSampler(cache, window + 2, 128, seed=4, pack=True)
        shard_ends = FIRST_WORD_ID + np.cumsum([s["tokens"] for s in cache.shards])
        for step in range(10):
            for tokens in _rows(sampler.batch(step)):
                assert np.all(np.diff(tokens) == 1)
                shard = int(np.searchsorted(shard_ends, tokens[0], side="right"))
                assert tokens[-1] < shard_ends[shard]
                assert len(tokens) == min(window, cache.shards[shard]["tokens"])
                crossed += np.searchsorted(_doc_bounds(), tokens[0], "right") != np.searchsorted(
                    _doc_bounds(), tokens[-1], "right")
    assert crossed > 0


def test_bad_arguments(data_word_cache, tmp_path):
    with pytest.raises(ValueError, match="longer than the model's 512 positions"):
        SegmentSampler(data_word_cache, 513, 4, seed=0, max_positions=512)
    with pytest.raises(ValueError, match="no room"):
        SegmentSampler(data_word_cache, 2, 4, seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside"):
        SegmentSampler(data_word_cache, 16, 4, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="step must be non-negative"):
        SegmentSampler(data_word_cache, 16, 4, seed=0).batch(-1)
    with pytest.raises(CacheError, match="no heldout documents"):
        TokenCache(data_word_cache.path, "heldout")


def test_loader_matches_batches_and_cache_pickles(data_word_cache_sharded):
    torch = pytest.importorskip("torch")
    sampler = SegmentSampler(data_word_cache_sharded, 24, 8, seed=9, two_segments=True)
    for workers in (0, 2):
        it = batches(sampler, 7, num_workers=workers)
        for step in (7, 8, 9):
            got, want = next(it), sampler.batch(step)
            assert all(got[k].dtype == torch.int64 and np.array_equal(got[k].numpy(), want[k]) for k in want)
        del it
    assert any(m is not None for m in sampler.cache._maps)  # shards mapped by the batches above
    clone = pickle.loads(pickle.dumps(sampler))
    assert all(m is None for m in clone.cache._maps)  # not copied: a worker maps the shards itself
    assert np.array_equal(clone.batch(3)["input_ids"], sampler.batch(3)["input_ids"])
    assert clone.cache.num_tokens == sum(DOC_LENGTHS)


LOADER_SCRIPT = """
import gc, multiprocessing, os, signal, subprocess, sys, time
import numpy as np

class Steps:
    def batch(self, step):
        if step >= 2 and sys.argv[2] == "stuck":
            time.sleep(3600)  # a worker that never finishes its batch
        return {"x": np.full((2, 3), step, dtype=np.int64)}

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1], force=True)
    from electra_ds.data.sampler import batches
    it = batches(Steps(), 0, num_workers=1)
    assert int(next(it)["x"][0, 0]) == 0
    worker = it.workers[0]
    print("worker", worker.pid, flush=True)
    if sys.argv[2] == "signals":  # from another process, as a terminal, torchrun or Slurm sends them
        for sig in ("INT", "TERM"):
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
        time.sleep(0.5)
        print("alive", worker.is_alive(), "next", [int(next(it)["x"][0, 0]) for _ in range(3)], flush=True)
        it.close()
    elif sys.argv[2] == "cycle":  # an iterator in a reference cycle: only the collector frees it
        cycle = [it]
        cycle.append(cycle)
        del it, cycle
        gc.collect()
    elif sys.argv[2] == "killed":
        time.sleep(3600)  # the test SIGKILLs this process
    if sys.argv[2] != "stuck":  # "stuck" leaves its worker to the exit handler
        worker.join(timeout=20)
        print("ended", not worker.is_alive(), "exit code", worker.exitcode, flush=True)
"""


def _loader_script(tmp_path, start_method: str, scenario: str):
    import subprocess
    import sys

    pytest.importorskip("torch")
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), start_method, scenario], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_loader_workers_outlive_stop_signals_from_other_processes(tmp_path, start_method):
    """SIGINT / SIGTERM sent to every process (terminal, torchrun, deepspeed, Slurm) must not kill a loader worker
    while the training process finishes its step and saves; close() still ends the workers. Every start method:
    spawned and forkserver workers run threads before worker_init_fn, and Python 3.14 makes forkserver the default."""
    proc = _loader_script(tmp_path, start_method, "signals")
    out, err = proc.communicate(timeout=120)
    lines = out.split("\n")
    assert proc.returncode == 0, err[-2000:]
    # The exit code is not checked: a spawned worker that was signalled sometimes aborts in C++ teardown as it exits.
    assert lines[1] == "alive True next [1, 2, 3]" and lines[2].startswith("ended True"), out + err[-2000:]


@pytest.mark.parametrize("scenario", ["stuck", "cycle"])
def test_loader_workers_end_when_stuck_or_collected(tmp_path, scenario):
    """A worker stuck in a batch ignores the loader's SIGTERM, and an iterator freed by the garbage collector from a
    reference cycle may find its queues closed: neither may leave a worker behind or hang the exit, and the freed
    one's worker is told to stop (exit code 0), not killed after a timeout."""
    proc = _loader_script(tmp_path, "fork", scenario)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err[-2000:]
    worker = int(out.split("\n")[0].split()[1])
    assert out.split("\n")[1] == ("" if scenario == "stuck" else "ended True exit code 0"), out + err[-2000:]
    assert not running(worker)


@needs_pidfd
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_loader_workers_end_with_a_killed_training_process(tmp_path, start_method):
    """SIGKILL leaves no exit handler: the workers must notice by themselves. Under forkserver their parent is
    the forkserver, which DataLoader's watchdog watches instead of the training process."""
    import select
    import signal

    proc = _loader_script(tmp_path, start_method, "killed")
    try:
        started, _, _ = select.select([proc.stdout], [], [], 120)
        assert started, "the loader script printed nothing in 120 s"
        worker = int(proc.stdout.readline().split()[1])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # a surviving worker would hold these pipes open
        proc.stderr.close()
    assert ended_within(worker, 30), f"worker {worker} still running 30 s after its training process was killed"
