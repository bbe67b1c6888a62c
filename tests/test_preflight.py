"""Stage 1's preflight: every mistake ends on the driver, at once, with a message naming the setting.

Fast tests (no Ray) cover each validation error and the resource check on fake clusters; the
``ray`` tests check the connected cluster, that ``fit`` stops before Ray Train starts, and that a
worker dying mid-run fails the whole run within seconds (``max_failures=0``).
"""
from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raymimic.clip import create_model, save_checkpoint
from raymimic.train import preflight as pf
from raymimic.train.config import TrainConfig
from raymimic.train.preflight import ClusterView, PreflightError, check_resources, check_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A pool with one (empty) tar shard, a raymimic-tiny reference and a raymimic-small checkpoint."""
    root = tmp_path_factory.mktemp("preflight")
    (root / "pool" / "shards").mkdir(parents=True)
    with tarfile.open(root / "pool" / "shards" / "00000000.tar", "w"):
        pass
    (root / "empty_pool").mkdir()
    torch.manual_seed(0)
    tiny = save_checkpoint(create_model("raymimic-tiny")[0], str(root / "tiny.pt"), "raymimic-tiny")
    small = save_checkpoint(create_model("raymimic-small")[0], str(root / "small.pt"), "raymimic-small")
    return {"root": root, "pool": str(root / "pool"), "tiny": tiny, "small": small}


def _cfg(files, **overrides) -> TrainConfig:
    values = dict(output=str(files["root"] / "run"), model="raymimic-tiny", reference=files["tiny"], global_batch=8,
                  samples_seen=16, workers=2, progress=False)
    return TrainConfig(**{**values, **overrides})


def _error(files, pool=None, **overrides) -> str:
    with pytest.raises(ValueError) as info:
        check_run(_cfg(files, **overrides), pool=files["pool"] if pool is None else pool)
    assert isinstance(info.value, PreflightError)
    assert "\n" not in str(info.value), "one line: the app prints it as one 'error: ...' line"
    return str(info.value)


# ----------------------------------------------------------------------------- validation


def test_a_good_run_passes_and_leaves_no_marker(files):
    cfg = _cfg(files, output=str(files["root"] / "fresh" / "run"))
    check_run(cfg, pool=files["pool"])
    assert os.listdir(cfg.output) == [], "the writability marker must be deleted"


def test_tau_must_be_positive(files):
    cfg = _cfg(files)
    cfg.tau = 0.0  # TrainConfig refuses it too; preflight must not rely on that
    with pytest.raises(PreflightError, match=r"^tau .* must be > 0, got 0.0"):
        check_run(cfg, pool=files["pool"])


def test_global_batch_must_divide_among_workers(files):
    message = _error(files, global_batch=9, samples_seen=18)
    assert "global_batch 9" in message and "workers=2" in message and "multiple of 2 (e.g. 10)" in message


def test_elastic_global_batch_must_divide_by_every_worker_count(files):
    message = _error(files, min_workers=2, max_workers=4)
    assert "[3]" in message and "min_workers=2 .. max_workers=4" in message and "multiple of 12" in message
    check_run(_cfg(files, min_workers=2, max_workers=4, global_batch=12, samples_seen=24), pool=files["pool"])


def test_unknown_mimic_layer_lists_the_aliases(files):
    message = _error(files, mimic_layer="image-mpl")
    assert message.startswith("mimic_layer 'image-mpl' does not resolve on model raymimic-tiny")
    for alias in ("image-mlp", "text-mlp", "image-proj", "text-proj"):
        assert alias in message


def test_mimic_layer_must_be_a_matrix(files):
    assert "not a 2-D weight matrix" in _error(files, mimic_layer="logit_scale")
    check_run(_cfg(files, mimic_layer="visual.transformer.resblocks.0.mlp.c_fc.weight"), pool=files["pool"])


def test_unknown_model(files):
    assert _error(files, model="ViT-B-33").startswith("model: unknown open_clip model 'ViT-B-33'; closest names: ['ViT-B-32'")


def test_missing_reference(files):
    missing = str(files["root"] / "missing.pt")
    message = _error(files, reference=missing)
    assert message.startswith("reference") and missing in message
    cfg = _cfg(files)
    cfg.reference, cfg.weighting = None, "grad-mimic"  # grad-mimic needs one (TrainConfig checks it too)
    with pytest.raises(PreflightError, match="reference is required by weighting 'grad-mimic'"):
        check_run(cfg, pool=files["pool"])


def test_reference_of_another_architecture_names_the_tensors(files):
    message = _error(files, reference=files["small"])
    assert message.startswith("reference") and "does not match the trained architecture" in message
    assert "visual.proj: model (64, 32) vs reference (128, 64)" in message


def test_pool_must_exist_and_hold_shards(files):
    assert _error(files, pool=str(files["root"] / "nowhere")).startswith("pool: pool root")
    assert "has no .tar shards" in _error(files, pool=str(files["root"] / "empty_pool"))


def test_output_must_be_writable(files):
    blocker = files["root"] / "a_file"
    blocker.write_text("not a folder")
    assert _error(files, output=str(blocker / "run")).startswith(f"output '{blocker / 'run'}' is not writable")
    assert "process-local memory filesystem" in _error(files, output="memory://run")


def test_missing_initial_weights(files):
    assert _error(files, pretrained=str(files["root"] / "nope.pt")).startswith("pretrained")


def test_amp_bf16_needs_gpus(files):
    assert _error(files, precision="amp_bf16").startswith("precision 'amp_bf16' needs GPU workers")


def test_custom_worker_resources_and_the_collective_timeout_are_checked(files):
    for overrides, expected in [({"resources_per_worker": {"CPU": 2}}, "use cpus_per_worker"),
                                ({"resources_per_worker": {"trainer_slot": -1}}, "amount >= 0"),
                                ({"collective_timeout_s": 0}, "collective_timeout_s must be")]:
        with pytest.raises(ValueError, match=expected):
            _cfg(files, **overrides)
    cfg = _cfg(files, use_gpu=True, resources_per_worker={"trainer_slot": 1})
    assert pf.worker_resources(cfg) == {"CPU": 1.0, "GPU": 1.0, "trainer_slot": 1.0}


# ----------------------------------------------------------------------------- resources


def test_two_one_cpu_workers_on_two_cpus_would_starve_ray_data(files):
    """The observed hang: the workers take both CPUs and the read/preprocess tasks never run."""
    with pytest.raises(PreflightError) as info:
        check_resources(_cfg(files), cluster={"CPU": 2})
    message = str(info.value)
    assert "= 3 CPU" in message and "2 CPUs on 1 node and no autoscaler" in message
    assert "cpus_per_worker=0.5 (--cpus-per-worker 0.5)" in message and "workers=1 (--workers 1)" in message
    plan = check_resources(_cfg(files, cpus_per_worker=0.5), cluster={"CPU": 2})
    assert plan.source == "nodes" and plan.needed == {"CPU": 2.0}


def test_the_test_sessions_ray_fits(files):
    assert check_resources(_cfg(files), cluster={"CPU": 4}).needed == {"CPU": 3.0}  # tests/conftest.py: num_cpus=4


def test_free_cpus_must_be_on_one_node(files):
    """4 x 0.75 CPU on two 2-CPU nodes leaves 1 CPU in all but 0.5 per node: no data task can start."""
    nodes = ClusterView(nodes=[{"CPU": 2.0}, {"CPU": 2.0}])
    with pytest.raises(PreflightError, match="no node keeps 1 CPU free"):
        check_resources(_cfg(files, workers=4, cpus_per_worker=0.75), cluster=nodes)
    check_resources(_cfg(files, workers=4, cpus_per_worker=0.5), cluster=nodes)


def test_missing_gpus_and_custom_resources(files):
    with pytest.raises(PreflightError, match=r"they need 2 GPU in all \(it has 0\)"):
        check_resources(_cfg(files, use_gpu=True), cluster={"CPU": 8})
    slots = _cfg(files, resources_per_worker={"trainer_slot": 1})
    with pytest.raises(PreflightError, match=r"2 trainer_slot in all \(it has 1\).*workers=1"):
        check_resources(slots, cluster=ClusterView(nodes=[{"CPU": 1}, {"CPU": 2, "trainer_slot": 1}]))


def test_elastic_runs_need_room_for_min_workers_and_must_not_grow_into_the_data_cpus(files):
    cfg = _cfg(files, min_workers=1, max_workers=4)
    with pytest.raises(PreflightError, match=r"may grow to 2 workers .* Use max_workers=1 \(--max-workers 1\)"):
        check_resources(cfg, cluster={"CPU": 2})
    assert check_resources(cfg, cluster={"CPU": 5}).workers == 1
    with pytest.raises(PreflightError, match="the training workers alone do not fit"):
        check_resources(_cfg(files, min_workers=3, max_workers=4), cluster={"CPU": 2})


def test_data_cpus(files):
    check_resources(_cfg(files), data_cpus=0, cluster={"CPU": 2})  # e.g. an in-memory dataset: no tasks
    with pytest.raises(PreflightError, match=r"\+ 2 CPU for the Ray Data tasks"):
        check_resources(_cfg(files, cpus_per_worker=0.5), data_cpus=2, cluster={"CPU": 2})
    with pytest.raises(PreflightError, match="data_cpus"):
        check_resources(_cfg(files), data_cpus=-1, cluster={"CPU": 8})


def test_autoscaler_ceiling(files):
    """A head that cannot host workers, and node types that can: the ceiling counts, not today's nodes."""
    slots = _cfg(files, resources_per_worker={"trainer_slot": 1})
    head_only = [{"CPU": 1.0}]
    plan = check_resources(slots, cluster=ClusterView(nodes=head_only, max_resources={"CPU": 4, "trainer_slot": 2}))
    assert plan.source == "autoscaler ceiling"
    with pytest.raises(PreflightError, match=r"grow the cluster to only 2 CPU and 1 trainer_slot: .*max nodes"):
        check_resources(slots, cluster=ClusterView(nodes=head_only, max_resources={"CPU": 2, "trainer_slot": 1}))
    plan = check_resources(slots, cluster=ClusterView(nodes=head_only, autoscaling=True))
    assert plan.source == "unverified" and "does not report its maximum size" in plan.notes[0]


def _status(mapping: dict) -> bytes:
    return json.dumps({"autoscaler_report": {"node_type_mapping": mapping}}).encode()


def test_autoscaler_detection_from_the_status(monkeypatch):
    import ray.autoscaler.v2.utils as v2
    import ray.experimental.internal_kv as kv

    monkeypatch.setattr(v2, "is_autoscaler_v2", lambda **kwargs: False)
    statuses = {
        # plain ray.init: the readonly provider names each node's type after the node
        "plain": (_status({"ab12": "node_ab12"}), False),
        # Ray's autoscaler v1 (ray up, AutoscalingCluster): node types from the cluster config
        "autoscaler": (_status({"ff00": "ray.head.default", "ff01": "trainer_node"}), True),
        "no status yet": (None, False),
    }
    for raw, expected in statuses.values():
        monkeypatch.setattr(kv, "_internal_kv_get", lambda key, *a, _raw=raw, **k: _raw if key == "__autoscaling_status" else None)
        assert pf._autoscaler_running() is expected
    monkeypatch.setattr(v2, "is_autoscaler_v2", lambda **kwargs: True)  # autoscaler v2 writes no such status
    assert pf._autoscaler_running() is True


# ----------------------------------------------------------------------------- with Ray


@pytest.mark.ray
def test_the_connected_local_cluster(ray_session, files):
    view = pf.current_cluster()
    assert view.max_resources is None, "a plain local Ray reports no autoscaler ceiling"
    assert view.autoscaling is False
    assert view.total["CPU"] == ray_session.cluster_resources()["CPU"]
    with pytest.raises(PreflightError, match="no autoscaler"):
        check_resources(_cfg(files, workers=4), cluster=view)


@pytest.mark.ray
def test_fit_stops_before_ray_train_starts(ray_session, files):
    from raymimic.train.trainer import fit

    output = files["root"] / "never"
    started = time.perf_counter()
    with pytest.raises(PreflightError, match="mimic_layer 'nope'"):
        fit(_cfg(files, output=str(output), mimic_layer="nope"), ray_session.data.from_items([{"x": 1}]), pool=files["pool"])
    with pytest.raises(PreflightError, match="not enough resources"):
        fit(_cfg(files, output=str(output), workers=4), ray_session.data.from_items([{"x": 1}]), pool=files["pool"])
    assert time.perf_counter() - started < 30
    assert not (output / "ray_train").exists(), "no Ray Train run may have started"


def _items(rows: int = 24) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"uid": f"{i:032x}", "image": rng.standard_normal((3, 32, 32)).astype(np.float32),
             "text": rng.integers(1, 400, size=16).astype(np.int64)} for i in range(rows)]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_dying_worker_fails_the_run_within_seconds(ray_session, files, monkeypatch):
    """Rank 1 dies at step 1 while rank 0 waits for it in a collective; max_failures=0: fit raises, nobody hangs."""
    from raymimic.train import loop
    from raymimic.train.trainer import fit

    cfg = _cfg(files, output=str(files["root"] / "crash"), samples_seen=32, checkpoint_every=2, log_every=1,
               score_flush_every=1, max_failures=0, collective_timeout_s=120)
    crash = loop.InjectedCrash(step=1, rank=1)
    monkeypatch.setattr(loop, "injected_crash", crash)
    with pytest.raises(Exception) as info:
        fit(cfg, ray_session.data.from_items(_items()), data_cpus=0)
    failed_at = time.time()
    assert not isinstance(info.value, PreflightError)
    marker = Path(crash.marker(cfg.output))
    assert marker.exists(), f"the injected crash did not happen: {info.value!r}"
    delay = failed_at - marker.stat().st_mtime
    print(f"the run failed {delay:.1f} s after rank 1 died: {type(info.value).__name__}")
    assert delay < 60, f"the run took {delay:.0f} s to notice a dead worker"


def test_a_run_ended_by_rays_scheduling_is_resumed_and_a_real_error_is_not(monkeypatch, tmp_path):
    """Ray Train's controller gives up when Ray removes the run's placement group; fit() resumes up to max_failures times."""
    import ray.train

    from raymimic.train import trainer
    from raymimic.train.config import TrainConfig

    removed = ray.train.ControllerError(RuntimeError("Destroying worker since its placement group was removed."))
    outcomes = []

    class FakeTrainer:
        def fit(self):
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    monkeypatch.setattr(trainer, "build_trainer", lambda cfg, dataset: FakeTrainer())
    cfg = TrainConfig(output=str(tmp_path), model="raymimic-tiny", reference=None, weighting="sgd", samples_seen=8, global_batch=8,
                      max_failures=2, controls=[])
    outcomes[:] = [removed, removed, "result"]
    assert trainer._fit_with_restarts(cfg, None) == "result"
    outcomes[:] = [removed, removed, removed]
    with pytest.raises(ray.train.ControllerError):
        trainer._fit_with_restarts(cfg, None)
    outcomes[:] = [ray.train.ControllerError(ValueError("a bug in the training code")), "result"]
    with pytest.raises(ray.train.ControllerError, match="a bug"):
        trainer._fit_with_restarts(cfg, None)
