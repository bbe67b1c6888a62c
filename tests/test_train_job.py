"""Score-only pass, and the smoke job submitted with ``ray job submit`` to a cluster of its own."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch

from raymimic.clip import create_model, resolve_mimic_layer, save_checkpoint
from raymimic.mimic import get_parameter
from raymimic.train.step import MimicStep

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def test_score_only_pass_matches_one_step_without_updating(ray_session, tmp_path):
    from raymimic.train.score_only import score_dataset, write_scores

    torch.manual_seed(5)
    model = create_model("raymimic-tiny")[0]
    checkpoint = save_checkpoint(model, str(tmp_path / "model.pt"), "raymimic-tiny", step=7, epoch=1)
    torch.manual_seed(6)
    reference = save_checkpoint(create_model("raymimic-tiny")[0], str(tmp_path / "ref.pt"), "raymimic-tiny")
    rng = np.random.default_rng(0)
    items = [{"uid": f"{i:032x}", "image": rng.standard_normal((3, 32, 32)).astype(np.float32),
              "text": rng.integers(1, 400, 16).astype(np.int64)} for i in range(10)]
    scored = score_dataset(ray_session.data.from_items(items).repartition(1), "raymimic-tiny", checkpoint, reference,
                           tau=0.5, batch_size=5)
    table = pq.read_table(write_scores(scored, str(tmp_path / "out"))).to_pandas().set_index("uid")
    assert len(table) == 10 and set(table["batch_size"]) == {5} and set(table["step"]) == {7} and set(table["epoch"]) == {1}
    assert str(pq.read_schema(next((tmp_path / "out" / "scores").glob("*.parquet"))).field("score").type) == "float"

    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(create_model("raymimic-tiny", pretrained=reference)[0], name).detach()
    step = MimicStep(model, name, "grad-mimic", tau=0.5, reference_weight=w_ref)
    for batch in (items[:5], items[5:]):  # one block of 10 rows -> batches of rows 0-4 and 5-9
        uids = [b["uid"] for b in batch]
        result = step(torch.as_tensor(np.stack([b["image"] for b in batch])), torch.as_tensor(np.stack([b["text"] for b in batch])))
        np.testing.assert_allclose(table.loc[uids, "score"], result.scores.numpy(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(table.loc[uids, "weight"], result.weights.numpy(), rtol=1e-3, atol=1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_smoke(tmp_path, ray_session):
    """`ray start --head` (own temp dir and ports), `ray job submit` the smoke job, check its outputs."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    # every port of our own: the defaults (e.g. the agent's 52365) may be taken by another cluster here
    own_ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    temp_dir = Path("/tmp") / f"rm-job-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true",
         "--disable-usage-stats", *own_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )
    output = tmp_path / "smoke-run"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        for _ in range(90):  # the dashboard's job server takes a while on a small machine
            if subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=env,
                              capture_output=True).returncode == 0:
                break
            time.sleep(2)
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                  "--", "python", "jobs/datacomp_small.py", "--smoke", "--output", str(output)]
        for _ in range(30):  # the per-node job agent comes up after the dashboard
            job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=420)
            if "No available agent" not in job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout.lower()
        assert f"score table: {output}/scores" in job.stdout
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # only the cluster this test started (never `ray stop`)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=15)
        shutil.rmtree(temp_dir, ignore_errors=True)

    from raymimic.clip.models import register_model_configs
    from raymimic.score_table import read_score_table

    register_model_configs()
    table = read_score_table(str(output / "scores"))
    assert table.num_rows == 8 * 8  # tiny preset: 8 steps of a global batch of 8
    assert len({(u, s) for u, s in zip(table["uid"].to_pylist(), table["step"].to_pylist())}) == table.num_rows
    model, _, _ = open_clip.create_model_and_transforms("raymimic-tiny", pretrained=str(output / "checkpoints" / "final.pt"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert list((output / "ray_train").glob("checkpoint_step_*"))
    # Stage 2 reads the Stage 1 run's score table as it is
    from raymimic.data.uids import read_subset_uids
    from raymimic.select.pipeline import FilterConfig, run_filter

    summary = run_filter(FilterConfig(str(output / "scores"), str(tmp_path / "filter"), method="ensemble", feature="step_z"))
    uids = set(table["uid"].to_pylist())
    assert summary["n_decisions"] == len(uids) and 0 < summary["n_kept"] < len(uids)
    assert set(read_subset_uids(str(tmp_path / "filter" / "keep.npy"))) <= uids
