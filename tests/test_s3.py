"""Object storage for real: the whole flow on ``s3://`` URIs against a moto S3 server.

A module-scoped fixture starts moto in server mode on a free localhost port and points every
layer at it through the standard environment variable ``AWS_ENDPOINT_URL`` (plus fake
credentials): fsspec/s3fs (botocore reads the variable), pyarrow's ``FileSystem.from_uri`` (Ray
Data's read/write_parquet, Ray Train's ``storage_path``). Whatever starts Ray runs in a
subprocess started after the variables are set, so every Ray worker inherits them; the
session's shared Ray (``ray_session``) may have started before this module and lacks them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
pytest.importorskip("moto.server")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "raymimic-test"
AWS_VARIABLES_TO_HIDE = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "RAY_ADDRESS")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with bucket ``BUCKET``; the AWS variables are set in os.environ while the module runs."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        # a fresh reference cache: a cached copy from another run must not stand in for this server's file
        "RAYMIMIC_CACHE": str(tmp_path_factory.mktemp("raymimic-cache")),
    }
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in AWS_VARIABLES_TO_HIDE:
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            s3fs.S3FileSystem.clear_instance_cache()  # instances made before the variables were set
            fs = s3fs.S3FileSystem()
            fs.mkdir(BUCKET)
            yield fs
            s3fs.S3FileSystem.clear_instance_cache()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pool(s3, tmp_path_factory):
    """``(local pool dir, s3 URI of the same pool, s3 URI of a random raymimic-tiny reference)``."""
    import torch

    from raymimic.clip import create_model, save_checkpoint
    from raymimic_experiments.toy_pool import make_toy_pool

    local = tmp_path_factory.mktemp("s3-pool") / "pool"
    make_toy_pool(str(local), samples=48, noise=0.3, seed=0, shard_size=16, eval_samples=0, workers=1)
    s3.put(str(local), f"{BUCKET}/pool", recursive=True)
    torch.manual_seed(1)
    reference = save_checkpoint(create_model("raymimic-tiny")[0], f"s3://{BUCKET}/ref.pt", "raymimic-tiny")
    return local, f"s3://{BUCKET}/pool", reference


def _subprocess_env() -> dict:
    """This process's environment (with the AWS variables of the fixture) for a child that starts its own Ray."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    done = subprocess.run(args, check=False, cwd=REPO, env=_subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done


def _local_uids(local: Path) -> list[str]:
    uids = []
    for shard in sorted((local / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            uids += [json.load(tar.extractfile(m))["uid"] for m in tar.getmembers() if m.name.endswith(".json")]
    return sorted(uids)


def test_pool_and_reference_on_s3_without_ray(pool):
    """The plain (no Ray) readers: listing, one shard, metadata, the reference copied to the local cache."""
    from raymimic.clip.models import load_reference, local_copy
    from raymimic.data.metadata import metadata_files, read_metadata_file
    from raymimic.data.pool import read_shard, shard_files

    local, uri, reference = pool
    shards = shard_files(uri)
    assert shards == [f"{uri}/shards/{p.name}" for p in sorted((local / "shards").glob("*.tar"))]
    rows = [row for batch, _ in read_shard(shards[0]) for row in batch]
    assert len(rows) == 16
    files = metadata_files(uri)
    assert files and all(f.startswith(f"{uri}/metadata/") for f in files)
    assert sorted(u for f in files for u in read_metadata_file(f, ["uid"])["uid"].to_pylist()) == _local_uids(local)
    copy = local_copy(reference)
    assert os.path.isfile(copy) and local_copy(reference) == copy
    assert sum(p.numel() for p in load_reference(reference, "raymimic-tiny").parameters()) > 0


def test_reference_rewritten_at_the_same_uri_is_fetched_again(s3):
    """The local cache is keyed by the remote file's version, not only its URI."""
    import torch

    from raymimic.clip import create_model, read_state_dict, save_checkpoint
    from raymimic.clip.models import local_copy

    uri = f"s3://{BUCKET}/rewritten/ref.pt"
    torch.manual_seed(2)
    first = local_copy(save_checkpoint(create_model("raymimic-tiny")[0], uri, "raymimic-tiny"))
    torch.manual_seed(3)
    second = local_copy(save_checkpoint(create_model("raymimic-tiny")[0], uri, "raymimic-tiny"))
    assert first != second
    old, new = read_state_dict(first), read_state_dict(second)
    assert any(not torch.equal(old[k], new[k]) for k in old)
    assert not [p for p in Path(second).parent.iterdir() if p.name.endswith(".part")]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        local_copy(f"s3://{BUCKET}/rewritten/missing.pt")


@pytest.mark.ray
def test_read_pool_on_s3_lists_the_local_pools_uids(pool):
    local, uri, _ = pool
    code = (
        "import json, sys, ray\n"
        "ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)\n"
        "ray.data.DataContext.get_current().enable_progress_bars = False\n"
        "from raymimic import read_pool\n"
        "uids = sorted(r['uid'] for r in read_pool(sys.argv[1], columns=['uid']).take_all())\n"
        "print('UIDS=' + json.dumps(uids))\n"
    )
    done = _run([sys.executable, "-c", code, uri], timeout=300)
    line = next(line for line in done.stdout.splitlines() if line.startswith("UIDS="))
    assert json.loads(line[len("UIDS="):]) == _local_uids(local)


@pytest.mark.slow
@pytest.mark.ray
def test_stage1_and_stage2_on_s3(s3, pool):
    """Stage 1 (Ray Train, storage on S3) and Stage 2 (`raymimic filter`) with every URI on S3."""
    import pyarrow.parquet as pq

    from raymimic.score_table import read_score_table

    local, pool_uri, reference = pool
    run, out = f"s3://{BUCKET}/run", f"s3://{BUCKET}/filter"
    _run([sys.executable, "jobs/datacomp_small.py", "--pool", pool_uri, "--reference", reference, "--output", run,
          "--model", "raymimic-tiny", "--global-batch", "8", "--samples-seen", "16", "--workers", "2", "--cpus-per-worker", "0.5"],
         timeout=600)
    _run([sys.executable, "-m", "raymimic.app.cli", "filter", "--scores", f"{run}/scores", "--pool", pool_uri, "--output", out, "--report"],
         timeout=300)

    table = read_score_table(f"{run}/scores")
    pairs = list(zip(table["uid"].to_pylist(), table["step"].to_pylist()))
    assert table.num_rows == 16 and len(set(pairs)) == table.num_rows and set(table["step"].to_pylist()) == {0, 1}
    assert set(table["uid"].to_pylist()) <= set(_local_uids(local))
    assert s3.isfile(f"{BUCKET}/run/checkpoints/final.pt")
    assert s3.glob(f"{BUCKET}/run/ray_train/checkpoint_step_*"), "Ray Train wrote no checkpoint to its S3 storage_path"

    with s3.open(f"{BUCKET}/filter/keep.npy", "rb") as f:
        keep = np.load(f, allow_pickle=False)
    assert keep.dtype == np.dtype("u8,u8") and 0 < len(keep) <= 16
    with s3.open(f"{BUCKET}/filter/summary.json") as f:
        summary = json.load(f)
    assert summary["n_kept"] == len(keep) and summary["pool_counts"]["n_pool_uids"] == 48
    with s3.open(f"{BUCKET}/filter/decisions.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == 48
    assert s3.isfile(f"{BUCKET}/filter/report.md") and s3.glob(f"{BUCKET}/filter/hist_*.png")


@pytest.mark.ray
def test_gallery_of_a_pool_on_s3_reads_only_the_shards_holding_the_picked_uids(s3, pool, tmp_path):
    """The picked uids all live in shard 0 of 3: the gallery reads that one shard and writes its page to S3."""
    import pandas as pd

    local, uri, _ = pool
    truth = pd.read_parquet(local / "ground_truth.parquet")
    rng = np.random.default_rng(0)
    score = rng.choice([-1, 1], len(truth)) * rng.uniform(1, 10, len(truth))
    first = np.flatnonzero(truth["shard"].to_numpy() == 0)
    # shard 0 holds the two lowest, the two highest and the two nearest the threshold (0)
    score[first[:6]] = [-100, -99, 99, 100, -0.01, 0.01]
    decisions = pd.DataFrame({"uid": truth["uid"], "score": score, "keep": score > 0})
    decisions.to_parquet(tmp_path / "decisions.parquet", index=False)
    code = (
        "import json, sys, ray\n"
        "import pandas as pd\n"
        "ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)\n"
        "ray.data.DataContext.get_current().enable_progress_bars = False\n"
        "from raymimic.select.gallery import write_gallery\n"
        "out = write_gallery(pd.read_parquet(sys.argv[1]), sys.argv[2], sys.argv[3], score_column='score', threshold=0.0, per_row=2,\n"
        "                    band=0.001)\n"
        "print('GALLERY=' + json.dumps({'tiles': out['tiles'], 'images': out['images'], 'shards_read': out['shards_read'],\n"
        "                               'problems': out['problems']}))\n"
    )
    done = _run([sys.executable, "-c", code, str(tmp_path / "decisions.parquet"), uri, f"s3://{BUCKET}/gallery"], timeout=300)
    line = next(line for line in done.stdout.splitlines() if line.startswith("GALLERY="))
    assert json.loads(line[len("GALLERY="):]) == {"tiles": 6, "images": 6, "shards_read": 1, "problems": {}}
    assert s3.isfile(f"{BUCKET}/gallery/gallery.html") and len(s3.glob(f"{BUCKET}/gallery/gallery_files/*.jpg")) == 6
    with s3.open(f"{BUCKET}/gallery/gallery.html", "r") as f:
        page = f.read()
    assert all(f'data-uid="{uid}"' in page for uid in truth["uid"].iloc[first[:6]])
