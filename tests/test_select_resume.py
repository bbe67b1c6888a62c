"""Stage 2 survives its own death: a driver killed (SIGKILL) in any round resumes to byte-identical outputs, redoing
only the tasks that had not committed; a Ray worker killed in a task is retried to the same outputs; a truncated spill file
is redone; other inputs or settings are refused."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from test_select_binarize import synthetic_scores
from test_select_stream import spread_uids, write_files

ROWS_PER_TASK = 12_000
"""Small tasks for the test: 8 map tasks and 8 merge partitions over the 8 files of about 11,000 rows."""
RUN = f"""
import sys
from raymimic.select.executors import tasks
tasks.ROWS_PER_TASK = tasks.ROWS_PER_PARTITION = {ROWS_PER_TASK}
from raymimic.select.pipeline import FilterConfig, run_filter
run_filter(FilterConfig(sys.argv[1], sys.argv[2], method=sys.argv[3]))
"""
KILL_A_WORKER = """
import os, signal, sys
from raymimic.select.executors import tasks
tasks.ROWS_PER_TASK = tasks.ROWS_PER_PARTITION = {rows}
tasks.LOCAL_ROWS = 0  # Ray tasks even for this small table
KILLED = sys.argv[4]

def {task}(*args):
    # pickled by value into the workers, where the module is not patched: the first call SIGKILLs its own worker process
    from raymimic.select.executors import tasks
    try:
        os.close(os.open(KILLED, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return tasks.{task}(*args)
    os.kill(os.getpid(), signal.SIGKILL)

tasks.{task} = {task}
from raymimic.select.pipeline import FilterConfig, run_filter
run_filter(FilterConfig(sys.argv[1], sys.argv[2], method=sys.argv[3]))
"""
ROUNDS = {  # the first committed file of each round, and the round's name in stats["stage2_tasks"]["rounds"]
    "map": "_stage2_tmp/rows/t*.bin.json",
    "merge": "_stage2_tmp/decisions/part-*.parquet.json",
    "outputs": ".tmp-*decisions.parquet",
}


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    table, _ = synthetic_scores(n_samples=30_000, batch=300, epochs=3)
    return write_files(spread_uids(table), tmp_path_factory.mktemp("resume") / "scores", parts=8)


@pytest.fixture(scope="module")
def reference(scores, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    subprocess.run([sys.executable, "-c", RUN, scores, str(out), "ensemble"], check=True, env=_env())
    return out


def _env() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]), "RAY_USAGE_STATS_ENABLED": "0"}


def kill_when(pattern: str, scores: str, out, method: str = "ensemble") -> None:
    """Start the driver and SIGKILL it as soon as a file matching ``pattern`` (under ``out``) appears."""
    child = subprocess.Popen([sys.executable, "-c", RUN, scores, str(out), method], env=_env())
    deadline = time.time() + 120
    while not glob.glob(f"{out}/{pattern}"):
        assert child.poll() is None, f"the run ended before {pattern} appeared"
        assert time.time() < deadline
        time.sleep(0.001)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()


def committed(out, pattern: str) -> int:
    """Tasks of a round whose markers are there (map tasks whose rows are merged and gone: by their summaries)."""
    if pattern == ROUNDS["map"] and not (out / "_stage2_tmp" / "rows").exists():
        pattern = "_stage2_tmp/summaries/t*.bin.pkl"
    return len(glob.glob(f"{out}/{pattern}"))


def assert_same_outputs(out, reference) -> dict:
    assert (out / "keep.npy").read_bytes() == (reference / "keep.npy").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "decisions.parquet"), pd.read_parquet(reference / "decisions.parquet"))
    assert not (out / "_stage2_tmp").exists() and not glob.glob(f"{out}/.tmp-*")
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("round_name", list(ROUNDS))
def test_a_driver_killed_in_any_round_resumes_to_identical_outputs(scores, reference, tmp_path, round_name):
    out = tmp_path / "out"
    kill_when(ROUNDS[round_name], scores, out)
    assert not (out / "summary.json").exists()  # killed: nothing looks complete
    before = {name: committed(out, pattern) for name, pattern in ROUNDS.items() if name != "outputs"}
    subprocess.run([sys.executable, "-c", RUN, scores, str(out), "ensemble"], check=True, env=_env())
    summary = assert_same_outputs(out, reference)
    rounds = summary["mimic"]["stage2_tasks"]["rounds"]
    # only the tasks that had not committed ran again
    assert rounds["map"] == {"tasks": 8, "run": 8 - before["map"], "committed_before": before["map"]}
    assert rounds["merge"] == {"tasks": 8, "run": 8 - before["merge"], "committed_before": before["merge"]}
    assert 0 < before[round_name] if round_name != "outputs" else before["merge"] == 8
    if round_name != "map":
        assert before["map"] == 8


@pytest.mark.parametrize("task", ["map_files", "merge_partition"])
def test_a_worker_killed_in_a_task_is_retried_to_identical_outputs(scores, reference, tmp_path, task):
    out, killed = tmp_path / "out", tmp_path / "killed"
    script = KILL_A_WORKER.format(rows=ROWS_PER_TASK, task=task)
    subprocess.run([sys.executable, "-c", script, scores, str(out), "ensemble", str(killed)], check=True, env=_env(), timeout=300)
    assert killed.exists()  # one worker died in the round's first task
    summary = assert_same_outputs(out, reference)  # the reference ran every round in one process, without a death
    decisions = pd.read_parquet(out / "decisions.parquet", columns=["uid"])
    assert decisions["uid"].is_unique and len(decisions) == summary["n_decisions"] == 30_000
    stage2 = summary["mimic"]["stage2_tasks"]
    assert not stage2["in_process"]
    assert stage2["rounds"]["map"] == stage2["rounds"]["merge"] == {"tasks": 8, "run": 8, "committed_before": 0}


def test_a_truncated_spill_file_is_redone_and_other_settings_are_refused(scores, reference, tmp_path):
    from raymimic.select.pipeline import FilterConfig, run_filter

    out = tmp_path / "out"
    kill_when(ROUNDS["merge"], scores, out)
    spilled = sorted(glob.glob(f"{out}/_stage2_tmp/rows/t*.bin"))
    assert len(spilled) == 8
    with open(spilled[3], "r+b") as f:
        f.truncate(os.path.getsize(spilled[3]) // 2)
    with pytest.raises(ValueError, match="unfinished Stage 2 run of other inputs or settings"):
        run_filter(FilterConfig(scores, str(out), method="gmm"))
    assert (out / "_stage2_tmp").exists()  # the refusal leaves the unfinished work as it was
    subprocess.run([sys.executable, "-c", RUN, scores, str(out), "ensemble"], check=True, env=_env())
    rounds = assert_same_outputs(out, reference)["mimic"]["stage2_tasks"]["rounds"]
    assert rounds["map"] == {"tasks": 8, "run": 1, "committed_before": 7}
    kill_when(ROUNDS["map"], scores, out)
    summary = run_filter(FilterConfig(scores, str(out), method="gmm", overwrite=True))
    assert summary["mimic"]["stage2_tasks"]["rounds"]["map"]["committed_before"] == 0
    assert np.isfinite(summary["fraction_kept"])
