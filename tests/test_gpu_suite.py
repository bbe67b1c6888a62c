"""GPU readiness: benchmarks/gpu_suite.sh fails clearly without a usable GPU, and the benchmark
programs it runs take --device / --precision / --batch and still run on the CPU."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.sh"
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def run(args, env=None, timeout=300):
    return subprocess.run(args, check=False, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def fake_nvidia_smi(tmp_path, exit_code: int) -> str:
    """A PATH whose first entry holds an ``nvidia-smi`` that prints a GPU line and exits ``exit_code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho 'GPU 0: Fake GPU (UUID: GPU-0)'\nexit {exit_code}\n")
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_suite_runs_both_benchmarks_with_the_gpu_settings(tmp_path):
    """With an NVIDIA GPU seen (a stand-in nvidia-smi) and an interpreter that records its calls, the suite runs the
    overhead benchmark at ViT-B-32, batch 256, bf16 on CUDA, and the throughput benchmark on every GPU, into OUTPUT_DIR."""
    calls = tmp_path / "calls.txt"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
case "$1" in
  -c) echo 2 ;;
  -) cat > /dev/null; echo '{{}}' > "$2" ;;
esac
""")
    python.chmod(0o755)
    env = {**ENV, "PATH": fake_nvidia_smi(tmp_path, exit_code=0), "PYTHON": str(python)}
    out = run(["bash", str(SUITE), str(tmp_path / "out")], env=env)
    assert out.returncode == 0, out.stderr
    lines = calls.read_text().splitlines()
    overhead = next(line.split() for line in lines if "mimic_overhead.py" in line)
    throughput = next(line.split() for line in lines if "train_throughput.py" in line)
    option = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert [option(overhead, o) for o in ("--models", "--batch", "--device", "--precision")] == ["ViT-B-32", "256", "cuda", "bf16"]
    assert option(overhead, "--json") == str(tmp_path / "out" / "mimic_overhead.json")
    assert "--gpu" in throughput and option(throughput, "--workers") == "2" and option(throughput, "--global-batch") == "512"
    assert option(throughput, "--precision") == "bf16"
    assert (tmp_path / "out" / "nvidia-smi.txt").exists() and (tmp_path / "out" / "environment.json").exists()


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_suite_fails_clearly_without_nvidia_smi(tmp_path):
    out = run(["bash", str(SUITE), str(tmp_path / "out")])
    assert out.returncode != 0
    assert "no GPU" in out.stderr and "nvidia-smi" in out.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_suite_fails_clearly_when_nvidia_smi_fails(tmp_path):
    env = {**ENV, "PATH": fake_nvidia_smi(tmp_path, exit_code=9)}
    out = run(["bash", str(SUITE), str(tmp_path / "out")], env=env)
    assert out.returncode != 0 and "nvidia-smi fails" in out.stderr


def test_suite_fails_clearly_when_torch_sees_no_gpu(tmp_path):
    env = {**ENV, "PATH": fake_nvidia_smi(tmp_path, exit_code=0), "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    out = run(["bash", str(SUITE), str(tmp_path / "out")], env=env)
    assert out.returncode != 0 and "torch.cuda.is_available() is False" in out.stderr


# ---------------------------------------------------------------- benchmark programs
def load(name: str):
    """A benchmark program as a module (in this process: no second torch start-up)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main_exit(module, argv, capsys) -> tuple[int, str, str]:
    """``module.main(argv)`` where it ends with SystemExit (--help, a parser error): (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    out = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err + (code if isinstance(code, str) else "")


def test_mimic_overhead_options_and_autocast(capsys):
    bench = load("mimic_overhead")
    code, help_text, _ = main_exit(bench, ["--help"], capsys)
    assert code == 0
    for option in ("--device", "--precision", "--batch", "--json"):
        assert option in help_text
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else contextlib.nullcontext():
        cuda = bench.autocast_for("cuda", "auto")  # bf16 autocast on CUDA by default
    assert isinstance(cuda, torch.autocast) and cuda.fast_dtype == torch.bfloat16 and cuda.device == "cuda"
    assert isinstance(bench.autocast_for("cpu", "auto"), contextlib.nullcontext)  # CPU default unchanged: fp32
    assert isinstance(bench.autocast_for("cuda", "fp32"), contextlib.nullcontext)
    assert bench.autocast_for("cpu", "bf16").fast_dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_mimic_overhead_runs_on_cpu_at_a_tiny_size(tmp_path, precision):
    path = tmp_path / "out.json"
    argv = ["--models", "raymimic-tiny", "--batch", "2", "--repeats", "1", "--skip-torch-func", "--device", "cpu",
            "--precision", precision, "--json", str(path)]
    assert load("mimic_overhead").main(argv) == 0
    (result,) = json.loads(path.read_text())["results"]
    assert result["device"] == "cpu" and result["precision"] == precision and result["batch"] == 2
    assert result["plain_s"] > 0 and result["mimic_s"] > 0 and result["training_step_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_benchmarks_refuse_cuda_without_a_gpu(capsys):
    code, _, err = main_exit(load("mimic_overhead"), ["--models", "raymimic-tiny", "--device", "cuda"], capsys)
    assert code != 0 and "torch.cuda.is_available() is False" in err
    code, _, err = main_exit(load("train_throughput"), ["--gpu", "--workers", "1"], capsys)
    assert code != 0 and "torch.cuda.is_available() is False" in err


def test_train_throughput_precision_option(capsys):
    throughput = load("train_throughput")
    code, help_text, _ = main_exit(throughput, ["--help"], capsys)
    assert code == 0 and "--precision" in help_text and "--gpu" in help_text and "--global-batch" in help_text
    code, _, err = main_exit(throughput, ["--precision", "bf16"], capsys)
    assert code != 0 and "--precision bf16 needs --gpu" in err
    assert throughput.TRAIN_PRECISION["bf16"] == "amp_bf16"  # raymimic's TrainConfig name
