"""Two-process pretraining on DeepSpeed's CPU accelerator (gloo): ZeRO-0 and ZeRO-2 over 2 ranks agree with 1 rank
at the same global batch and keep identical replicas (checked at every save), and a rank that dies makes the other
exit with an error instead of hanging."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env
from electra_ds.train.engine import free_port
from electra_ds.train.metrics_log import MetricsFile
from electra_ds.train.pretrain import parse_args, run

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["--model_override", "hidden_dropout_prob=0", "--model_override", "attention_probs_dropout_prob=0"]


def fp32_zero(folder: Path, stage: int) -> Path:
    path = folder / f"fp32_zero{stage}.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                                "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
                                "zero_optimization": {"stage": stage}}))
    return path


@pytest.fixture(scope="module")
def zero2_fp32(tmp_path_factory) -> Path:
    return fp32_zero(tmp_path_factory.mktemp("ds"), 2)


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("restore_environ")]


def argv(data: Path, out: Path, ds_config: Path | str, micro_batch: int, steps: int, *extra: str) -> list[str]:
    return ["--model_size", "tiny", "--data", str(data), "--output_dir", str(out), "--max_length", "32",
            "--per_device_train_batch_size", str(micro_batch), "--max_steps", str(steps), "--warmup_steps", "2",
            "--learning_rate", "2e-3", "--logging_steps", "8", "--eval_steps", str(8 * steps), "--eval_batches", "1",
            "--wandb", "disabled", "--num_workers", "0", "--no-export_hf", "--deepspeed_config", str(ds_config),
            "--dist_timeout", "30", *NO_DROPOUT, *extra]


def torchrun(script: Path, *args: str) -> list[str]:
    """The command running SCRIPT ARGS... on 2 ranks through torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(script), *args]


def two_ranks(script: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """SCRIPT ARGS... on 2 ranks through torchrun (one thread each: the machine has 2 cores)."""
    return subprocess.run(torchrun(script, *args), env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout)


def train_losses(out: Path) -> np.ndarray:
    return np.array([r["loss"] for r in MetricsFile(out / "metrics.jsonl").records() if r["split"] == "train"])


@pytest.mark.parametrize("zero", [2, 0])  # ZeRO-0: the all-reduced gradient is clipped inside ElectraAdam
def test_two_ranks_agree_with_one_rank(corpus, zero2_fp32, tmp_path, zero):
    config = zero2_fp32 if zero == 2 else "fp32"
    steps = 12
    two = tmp_path / "two"
    proc = two_ranks(REPO / "launch" / "pretrain.py", *argv(corpus, two, config, 4, steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "run_config.json").read_text())["world_size"] == 2
    one = tmp_path / "one"
    run(parse_args(argv(corpus, one, config, 8, steps)))
    a, b = train_losses(two), train_losses(one)
    assert len(a) == len(b) == steps
    # Same data, weights and schedule; only the masking/sampling noise differs (it is drawn per rank).
    np.testing.assert_allclose(a[0], b[0], rtol=0.03)
    np.testing.assert_allclose(a, b, rtol=0.1)
    assert a[-3:].mean() < 0.85 * a[:2].mean() and b[-3:].mean() < 0.85 * b[:2].mean()


@pytest.mark.parametrize("zero", [0, 3])  # ZeRO-3: every rank must run as many forwards (uneven shares here)
def test_evaluation_does_not_depend_on_the_number_of_ranks(corpus, tmp_path, zero):
    """The ranks share out one stream of held-out batches, masked alike: 2 ranks report what 1 rank does. The one
    step before the evaluation runs at learning rate 0 (warm-up), so both evaluate the initial weights."""
    config = "fp32" if zero == 0 else fp32_zero(tmp_path, zero)
    extra = ("--eval_batches", "5")  # 3 on rank 0, 2 on rank 1
    two, one = tmp_path / "two", tmp_path / "one"
    proc = two_ranks(REPO / "launch" / "pretrain.py", *argv(corpus, two, config, 4, 1, *extra))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run(parse_args(argv(corpus, one, config, 4, 1, *extra)))
    records = [MetricsFile(out / "metrics.jsonl").records() for out in (two, one)]
    assert [r["lr"] for rs in records for r in rs if r["split"] == "train"] == [0.0, 0.0]
    (eval_two,), (eval_one,) = [[r for r in rs if r["split"] == "eval"] for rs in records]
    assert eval_two.keys() == eval_one.keys()
    for key, value in eval_one.items():
        assert eval_two[key] == pytest.approx(value, rel=1e-5), key


def rank_pid(launcher_pid: int, rank: int) -> int:
    """The process id of `rank`, a child of the launcher (read from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid and f"\0RANK={rank}\0" in "\0" + (stat.parent / "environ").read_text():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    raise AssertionError(f"no rank {rank} under process {launcher_pid}")


@pytest.mark.parametrize("signalled", ["launcher", "rank 1"])
def test_a_stop_request_stops_every_rank_at_one_step(corpus, tmp_path, signalled):
    """SIGTERM to the launcher's process group (torchrun passes it on to each rank's), or to one rank alone: every
    rank stops at the same step, with no logging step to wait for (none falls in this run), and saves there (the
    rank-1 case: torchrun exits 0). With a data loader worker: it must not die of the signal before the save. (How
    soon after the signal is not observed here: StopVote.LAG bounds it by construction.)"""
    from electra_ds.train.checkpoint import CheckpointManager

    out, log = tmp_path / "out", tmp_path / "run.log"
    command = torchrun(REPO / "launch" / "pretrain.py",
                       *argv(corpus, out, "fp32", 4, 5000, "--logging_steps", "80000", "--save_steps", "80000",
                             "--num_workers", "1"))
    with log.open("w") as f:
        proc = subprocess.Popen(command, env=child_env(OMP_NUM_THREADS="1"), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, which the signal goes to
    try:
        deadline = time.time() + 600
        while "INFO electra_ds.pretrain: training " not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(2)  # some steps in
        if signalled == "launcher":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()  # signalled itself, torchrun ends with a traceback of the signal
    by = "SIGTERM" if signalled == "launcher" else "a signal on another rank"
    stopped = re.search(rf"\[rank 0\] WARNING electra_ds.pretrain: stopped by {by} at step (\d+)", text)
    assert stopped and "] ERROR" not in text and "RuntimeError" not in text, text[-3000:]
    assert [s for s, _ in CheckpointManager(out / "checkpoints", 3, 0, 1).complete()] == [int(stopped[1])]
    if signalled == "rank 1":
        assert proc.returncode == 0, text[-3000:]


NO_AVERAGING_SCRIPT = """
import sys
from deepspeed.runtime.engine import DeepSpeedEngine
from electra_ds.train import pretrain

DeepSpeedEngine.allreduce_gradients = lambda self, *args, **kwargs: None  # each rank keeps its own gradients
sys.exit(pretrain.main(sys.argv[1:]))
"""


def test_ranks_that_stop_averaging_gradients_are_caught_before_saving(corpus, tmp_path):
    """The replica check behind the agreement test above: ranks that step on their own gradients drift apart, and
    the save stops the run instead of writing rank 0's weights as if they were everyone's."""
    script = tmp_path / "no_averaging.py"
    script.write_text(NO_AVERAGING_SCRIPT)
    out = tmp_path / "out"
    proc = two_ranks(script, *argv(corpus, out, "fp32", 4, 4))
    assert proc.returncode != 0
    assert "at step 4 the weights of rank(s) [1] differ from rank 0's (relative gaps" in proc.stdout + proc.stderr, \
        proc.stderr[-3000:]
    assert not (out / "checkpoints" / "step00000004").exists()


def test_a_dead_rank_makes_the_other_fail_instead_of_hanging(corpus, zero2_fp32, tmp_path):
    out = tmp_path / "out"
    port = str(free_port())
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"rank{rank}.log")
        env = child_env(OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(REPO / "launch" / "pretrain.py"),
                                       *argv(corpus, out, zero2_fp32, 4, 100_000)],
                                      env=env, stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    try:
        deadline = time.time() + 180
        while len(MetricsFile(out / "metrics.jsonl").records()) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        rc = procs[0].wait(timeout=90)
        assert rc == 4, logs[0].read_text()[-3000:]
        assert "another rank died, hung or was killed" in logs[0].read_text()
        assert time.time() - killed_at < 60  # --dist_timeout 30 bounds it; gloo usually notices at once
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


AGREE_SCRIPT = """
import datetime, json, os, sys
import torch.distributed as dist
from electra_ds.train.checkpoint import CheckpointError, CheckpointManager

class LoadsAnything:  # stands in for the DeepSpeed engine
    def load_checkpoint(self, root, tag, **kw):
        return root, {}

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
root = os.path.join(sys.argv[1], f"rank{rank}")
if rank == 0:  # only rank 0 sees a checkpoint (e.g. a directory that is not shared between nodes)
    os.makedirs(os.path.join(root, "step00000005"))
    with open(os.path.join(root, "step00000005", "MANIFEST.json"), "w") as f:
        json.dump({"files": {}}, f)
try:
    CheckpointManager(root, 3, rank, 2).restore(LoadsAnything())
    outcome = "restored"
except CheckpointError as e:
    outcome = str(e)
with open(os.path.join(sys.argv[1], f"outcome{rank}"), "w") as f:
    f.write(outcome)
dist.destroy_process_group()
"""


def test_ranks_that_restore_different_steps_stop_with_a_clear_error(tmp_path):
    """A rank that finds no checkpoint still takes part in the check: every rank stops with CheckpointError, none
    is left waiting in a collective."""
    from electra_ds.train.checkpoint import MANIFEST

    script = tmp_path / "agree.py"
    script.write_text(AGREE_SCRIPT.replace("MANIFEST.json", MANIFEST))
    proc = two_ranks(script, str(tmp_path), timeout=120)
    outcomes = [(tmp_path / f"outcome{r}").read_text() if (tmp_path / f"outcome{r}").is_file() else proc.stderr[-2000:]
                for r in (0, 1)]
    for outcome in outcomes:
        assert "ranks restored different checkpoints (steps -1..5" in outcome, outcome


SLOW_CACHE_SCRIPT = """
import datetime, os, sys, time
import torch.distributed as dist
import electra_ds.data.cache
from electra_ds.train import pretrain

def slow_build(*args, **kwargs):  # stands in for hours of tokenizing
    time.sleep(4)
    return "/built/cache"

electra_ds.data.cache.ensure_cache = slow_build
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1))  # --dist_timeout 1
try:
    outcome = str(pretrain.prepare_cache(pretrain.parse_args(["--data", "big_corpus"]), rank))
    dist.barrier()  # the default group still works after the cache group is gone
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"
with open(os.path.join(sys.argv[1], f"outcome{rank}"), "w") as f:
    f.write(outcome)
"""


def test_ranks_wait_for_a_cache_build_longer_than_dist_timeout(tmp_path):
    """Rank 0 builds the cache (4 s here, hours for a real corpus) while rank 1 waits beyond --dist_timeout (1 s)."""
    script = tmp_path / "slow_cache.py"
    script.write_text(SLOW_CACHE_SCRIPT)
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=child_env(OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for rank in (0, 1)]
    logs = [p.communicate(timeout=60)[0] for p in procs]
    outcomes = [(tmp_path / f"outcome{r}").read_text() if (tmp_path / f"outcome{r}").is_file() else logs[r][-2000:]
                for r in (0, 1)]
    assert outcomes == ["/built/cache"] * 2, outcomes

