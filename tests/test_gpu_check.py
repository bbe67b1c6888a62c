"""benchmarks/gpu_check.py, the check for a lent GPU machine, runs end to end on the CPU at tiny sizes and imports no Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "benchmarks" / "gpu_check.py"


def _run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, str(CHECK), *argv], cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
                          check=False)


def test_gpu_check_passes_on_cpu_at_tiny_sizes_without_importing_ray(tmp_path):
    # a ray package that fails on import: the check (and every raymimic module it imports) must not need it
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('the GPU machine has no Ray')\n")
    out = tmp_path / "check.json"
    done = _run("--device", "cpu", "--small", "--steps", "1", "--json", str(out),
                env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["failures"] == []
    assert result["environment"]["device"] == "cpu" and result["environment"]["open_clip"]
    assert {(r["model"], r["precision"]) for r in result["probe"]} == {("raymimic-tiny", "fp32"), ("raymimic-tiny", "bf16")}
    fp32 = next(r for r in result["probe"] if r["precision"] == "fp32")
    assert fp32["score_max_rel_error"] < 1e-4 and fp32["uniform_grad_rel_error"] < 1e-4
    assert result["gather"] == {"backend": "gloo", "exact": True}
    assert result["ddp"]["exact"] and max(result["ddp"]["max_rel_error"].values()) < 1e-4
    assert result["step_speed"]["plain_step_s"] > 0 and result["step_speed"]["mimic_step_s"] > 0
    assert all(result["feed_speed"][f"{k}_samples_per_s"] > 0 for k in ("resident", "former_feed", "device_feed"))


def test_gpu_check_says_what_to_do_without_open_clip_or_wheels(tmp_path):
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = _run("--device", "cpu", "--small", "--wheels", str(tmp_path / "no-wheels"),
                env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "cannot import open_clip" in line and "holds no wheels" in line and "pip download" in line and "open_clip_torch" in line
