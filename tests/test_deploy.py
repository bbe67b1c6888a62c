"""The cluster configurations users deploy (deploy/): the Ray cluster-launcher YAML against the schema
that ships in the installed ray package, the KubeRay RayJob's structure, and every job command in
them (and in docs/cluster.md) against the flags the Stage-1 job really accepts."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "deploy" / "cluster-aws.yaml"
RAYJOB = REPO / "deploy" / "kuberay-rayjob.yaml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCS = REPO / "docs" / "cluster.md"
JOB = "jobs/datacomp_medium.py"
_COMMAND = re.compile(r"python3?\s+\S*" + re.escape(JOB) + r"(?P<args>.*)")


# ----------------------------------------------------------------------------- helpers
def job_commands(text: str, comment: str | None = None) -> list[str]:
    """The arguments of every ``python .../jobs/datacomp_medium.py ...`` command in ``text``:
    lines joined across trailing backslashes, ``comment`` prefixes (``#``) removed first."""
    lines, joined, current = text.splitlines(), [], ""
    for line in lines:
        if comment is not None:
            stripped = line.lstrip()
            if not stripped.startswith(comment):
                current = ""
                continue
            line = stripped[len(comment):]
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [m.group("args") for m in map(_COMMAND.search, joined) if m]


def fenced_code(markdown: str) -> str:
    """The lines inside the ``` blocks of a markdown text (commands, not prose that names one)."""
    inside, lines = False, []
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
        elif inside:
            lines.append(line)
    return "\n".join(lines)


def flags(args: str) -> list[str]:
    return [token.split("=", 1)[0] for token in args.split() if token.startswith("--")]


def flag_value(args: str, flag: str) -> str | None:
    tokens = args.split()
    for i, token in enumerate(tokens):
        if token == flag and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


@pytest.fixture(scope="module")
def job_help() -> str:
    """``python jobs/datacomp_medium.py --help``: the flags the job accepts, however its parser is built."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, JOB, "--help"], check=False, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "--pool" in out.stdout
    return out.stdout


def assert_flags_accepted(args: str, help_text: str) -> None:
    used = flags(args)
    assert used, f"no flags in {args!r}"
    unknown = [f for f in used if not re.search(r"(?<![\w-])" + re.escape(f) + r"(?![\w-])", help_text)]
    assert not unknown, f"{JOB} --help does not list {unknown} (used in: {args.strip()})"
    for required in ("--pool", "--reference", "--output"):
        assert required in used, f"{required} missing from {args.strip()}"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


# ------------------------------------------------------------------- cluster launcher
def test_launcher_yaml_validates_against_rays_schema(launcher, ray_schema):
    import jsonschema

    jsonschema.validate(launcher, ray_schema)
    # what `ray up` runs before it talks to the cloud: defaults merged, then validated again
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(launcher)))


def test_schema_check_catches_mistakes(launcher, ray_schema):
    """The schema forbids unknown keys in a node type, so a typo does not pass silently."""
    import jsonschema

    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["ray.worker.gpu"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)
    broken = copy.deepcopy(launcher)
    broken["available_node_types"]["ray.worker.gpu"]["resources"]["GPU"] = "4"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema)


def test_launcher_head_is_cpu_and_gpu_workers_autoscale_from_zero(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "min_workers" not in head
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types and launcher["head_node_type"] not in gpu_types
    for name, node in gpu_types.items():
        assert node["min_workers"] == 0, name
        assert 1 <= node["max_workers"] <= launcher["max_workers"], name
        assert node["resources"]["CPU"] > node["resources"]["GPU"], "CPUs beside the GPUs feed Ray Data"
        assert node["node_config"]["InstanceType"].startswith(("g4", "g5", "g6", "p3", "p4", "p5")), name


def test_launcher_installs_the_project(launcher):
    setup = " ".join(launcher.get("setup_commands", []) + launcher.get("worker_setup_commands", []))
    assert re.search(r"pip install (-e )?\S*raymimic", setup)
    assert "." in launcher["file_mounts"].values()  # the repository, copied from where `ray up` runs
    assert ".venv" in launcher.get("rsync_exclude", [])


def test_launcher_comment_commands_use_real_flags(launcher, job_help):
    commands = job_commands(LAUNCHER.read_text(), comment="#")
    assert commands, "the usage comment shows a ray job submit command"
    gpus = max(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in launcher["available_node_types"].values())
    for args in commands:
        assert_flags_accepted(args, job_help)
        assert "--gpu" in flags(args)
        assert int(flag_value(args, "--workers")) <= gpus, "more GPU workers than the cluster can start"
    assert "ray job submit --address" in LAUNCHER.read_text() and "ray up deploy/cluster-aws.yaml" in LAUNCHER.read_text()


# ---------------------------------------------------------------------------- KubeRay
def test_rayjob_manifest(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    gpu_groups = []
    for group in cluster["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
            assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
            # Kubernetes needs GPU requests equal to limits when both are given
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
            assert container["image"] == cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"


def test_rayjob_entrypoint_runs_the_job_with_real_flags(rayjob, job_help):
    spec = rayjob["spec"]
    commands = job_commands(spec["entrypoint"])
    assert len(commands) == 1, spec["entrypoint"]
    args = commands[0]
    assert_flags_accepted(args, job_help)
    assert flag_value(args, "--pool").startswith("s3://") and flag_value(args, "--output").startswith("s3://")
    assert flag_value(args, "--reference") == "ViT-B-32:datacomp_m_s128m_b4k"
    assert "--gpu" in flags(args)
    capacity = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert int(flag_value(args, "--workers")) <= capacity, "more GPU workers than the worker group can start"


def test_ray_versions_agree(rayjob, launcher):
    """One Ray version across the RayJob, its image's Dockerfile and the launcher's images."""
    version = rayjob["spec"]["rayClusterSpec"]["rayVersion"]
    tags = re.findall(r"rayproject/ray:([0-9][^-\s\"]*)", LAUNCHER.read_text() + DOCKERFILE.read_text())
    assert tags and set(tags) == {version}


# ------------------------------------------------------------------------------- docs
def test_cluster_docs_commands_use_real_flags(job_help):
    text = DOCS.read_text()
    commands = job_commands(fenced_code(text))
    assert len(commands) >= 2  # the launcher's ray job submit and the RayJob's entrypoint
    for args in commands:
        assert_flags_accepted(args, job_help)
    for topic in ("deploy/cluster-aws.yaml", "deploy/kuberay-rayjob.yaml", "AWS_ENDPOINT_URL", "--cpus-per-worker", "same --output"):
        assert topic in text, topic


def test_flag_check_rejects_unknown_and_missing_flags(job_help):
    text = ("#   ray job submit -- \\\n"
            "#     python jobs/datacomp_medium.py --pool s3://b/p \\\n"
            "#     --reference R --output s3://b/o --workerz 8\n")
    (args,) = job_commands(text, comment="#")
    assert flags(args) == ["--pool", "--reference", "--output", "--workerz"]
    with pytest.raises(AssertionError, match="--workerz"):
        assert_flags_accepted(args, job_help)
    with pytest.raises(AssertionError, match="--output missing"):
        assert_flags_accepted(" --pool s3://b/p --reference R", job_help)
