"""``raymimic filter`` on bad input, tried as a new user would: one line naming the file, column or option, exit status 2,
well within 30 s, and nothing in --output that looks complete."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from test_select_binarize import synthetic_scores

from raymimic.app.cli import main


@pytest.fixture(scope="module")
def table():
    return synthetic_scores(n_samples=300, batch=30, epochs=3)[0]


def write(table: pd.DataFrame, folder, parts: int = 2) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(table)), parts)):
        table.iloc[idx].to_parquet(f"{folder}/{i:05d}.parquet", index=False)
    return str(folder)


def assert_one_line_exit_2(capsys, scores: str, output: str, *words: str) -> None:
    started = time.time()
    with pytest.raises(SystemExit) as exited:
        main(["filter", "--scores", scores, "--output", output])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raymimic filter: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert time.time() - started < 30
    assert not any(os.path.exists(f"{output}/{name}") for name in ("summary.json", "keep.npy", "decisions.parquet"))


def test_missing_scores_not_parquet_and_unwritable_output(capsys, tmp_path, table):
    assert_one_line_exit_2(capsys, str(tmp_path / "nowhere"), str(tmp_path / "out"), "nowhere", "do not exist")
    scores = write(table, tmp_path / "scores")
    (tmp_path / "scores" / "00002.parquet").write_text("not a parquet file")
    assert_one_line_exit_2(capsys, scores, str(tmp_path / "out"), "00002.parquet", "not a readable parquet file")
    good = write(table, tmp_path / "good")
    (tmp_path / "a_file").write_text("")
    assert_one_line_exit_2(capsys, good, str(tmp_path / "a_file" / "out"), "a_file", "cannot be written")


@pytest.mark.parametrize("case, words", [
    ("schemas disagree", ["disagree in schema", "'note'", "00001.parquet"]),
    ("no score column", ["00000.parquet", "lacks column(s) ['score']"]),
    ("no uid column", ["00000.parquet", "lacks column(s) ['uid']"]),
    ("non-hex uid", ["00001.parquet", "malformed uid"]),
    ("short uid", ["00000.parquet", "malformed uid"]),
    ("negative batch size", ["00000.parquet", "batch_size <= 0"]),
    ("all scores NaN", ["no usable row"]),
    ("empty table", ["empty"]),
    ("empty folder", ["empty"]),
])
def test_bad_tables(capsys, tmp_path, table, case, words):
    folder = tmp_path / "scores"
    if case == "schemas disagree":
        write(table.assign(note=1), folder, 1)
        table.assign(note="x").to_parquet(folder / "00001.parquet", index=False)
    elif case == "no score column":
        write(table.drop(columns="score"), folder)
    elif case == "no uid column":
        write(table.drop(columns="uid"), folder)
    elif case == "non-hex uid":
        write(table.assign(uid=table["uid"].where(np.arange(len(table)) != len(table) - 1, "z" * 32)), folder)
    elif case == "short uid":
        write(table.assign(uid=table["uid"].str[:30]), folder)
    elif case == "negative batch size":
        write(table.assign(batch_size=np.int32(-30)), folder)
    elif case == "all scores NaN":
        write(table.assign(score=np.float32("nan")), folder)
    elif case == "empty table":
        write(table.iloc[:0], folder, 1)
    else:
        folder.mkdir()
    assert_one_line_exit_2(capsys, str(folder), str(tmp_path / "out"), *words)


def test_a_disk_that_fills_during_the_spill(tmp_path, table):
    """Files of the run may not grow above 8 KiB (RLIMIT_FSIZE): the spill hits the limit as it would a full disk."""
    scores = write(table, tmp_path / "scores")
    out = tmp_path / "out"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "raymimic.app.cli", "filter", "--scores", scores, "--output", str(out)],
                          capture_output=True, text=True, env=env, preexec_fn=limit_file_size)
    assert done.returncode == 2 and time.time() - started < 30
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "no space left to write under --output" in err[0] and "rerun" in err[0], err
    assert not any((out / name).exists() for name in ("summary.json", "keep.npy", "decisions.parquet"))
