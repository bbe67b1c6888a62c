"""Stage 1 and Stage 2 on an autoscaling cluster: Ray's fake multi-node autoscaler starts nodes as local processes.

The head (1 CPU, no ``trainer_slot``) cannot host a training worker. The autoscaler adds
``trainer_node``s (2 CPUs and 1 ``trainer_slot``, standing in for a GPU; 0 to 2 of them) when
Stage 1 asks for its workers with ``TrainConfig(resources_per_worker={"trainer_slot": 1})``.
One module-scoped cluster serves three drivers, each running this file in a subprocess: a Stage 1
run on autoscaled nodes during which one trainer node's raylet is killed (it resumes on a
replacement node from its last checkpoint, and must end with exactly one score row per
(uid, step)); Stage 2 on its scores, which also checks, while the trainer nodes are still up,
that pool reads keep their ledger actor on the driver's node; Stage 2 on Ray tasks that only
trainer nodes can host (``task_resources``), over a table of 8 files, during whose map round a
trainer node is lost (its raylet and every process under it killed) while it runs map tasks: Ray
reruns them elsewhere, and the outputs are those of an uninterrupted run.

The cluster starts as ``ray.cluster_utils.AutoscalingCluster(autoscaler_v2=True).start`` does (``ray start
--head --autoscaling-config`` with ``RAY_FAKE_CLUSTER=1``, fake multi-node provider), except that it
does not run ``ray stop --force`` (which stops every Ray instance on the machine), it keeps its
own temp dir (so a plain ``ray.init()`` elsewhere never finds it) and its own process group, and
it ends by killing exactly the processes it started, by pid. (The installed Ray wheel also lacks
the ``example.yaml`` that ``AutoscalingCluster`` reads.) The drivers run in subprocesses, so the
session's local Ray (``ray_session`` in conftest.py) is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "raymimic-tiny"
SLOT = "trainer_slot"
NODE_TYPE = "trainer_node"
POOL_SAMPLES, BATCH = 48, 8
STEPS = 16  # 6 steps an epoch: every uid is scored, and 12 steps after the step-4 checkpoint leave time to kill a node
LEDGERS = 6  # pool reads whose ledgers must all land on the driver's node
MAP_FILES = 8  # files of the Stage 2 table, one map task each
MAP_SECONDS = 5.0  # how long each map task attempt waits before its work: a node's tasks are caught mid-flight


# ----------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _descendants(pids: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    """Every process started under ``pids`` (their children, theirs, ...), from ``table`` (:func:`_processes`)."""
    found = set(pids)
    while True:
        children = {pid for pid, (parent, _) in table.items() if parent in found} - found
        if not children:
            return found - set(pids)
        found |= children


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class FakeAutoscalingCluster:
    """A head with ``head_cpus`` CPUs and autoscaler v2 launching 0..max_nodes ``trainer_node``s as local processes.

    Autoscaler v2, as ``AutoscalingCluster(autoscaler_v2=True)``: v1 never terminates a fake node whose raylet died
    (the fake provider's nodes keep the status tag "uninitialized", which v1 leaves alone), so at ``max_nodes`` it
    could not launch a replacement; v2 reconciles dead Ray nodes with the provider's instances and replaces them.
    """

    def __init__(self, head_cpus: int = 1, node_cpus: int = 2, max_nodes: int = 2):
        self.temp_dir = tempfile.mkdtemp(prefix="rmas-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
        self.head_cpus, self.node_cpus, self.max_nodes = head_cpus, node_cpus, max_nodes
        self.pgid: int | None = None
        self.address: str | None = None

    def _config(self, gcs_address: str) -> dict:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        store = 150 * 1024 ** 2
        # type "external" naming the fake provider's class: with type "fake_multinode" the autoscaler reads defaults from
        # the provider's example.yaml, which the installed Ray wheel lacks
        provider = {"type": "external", "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                    "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
                    "gcs_address": gcs_address, "launch_multiple": True, "head_node_id": FAKE_HEAD_NODE_ID}
        return {
            "cluster_name": "raymimic-fake", "max_workers": self.max_nodes, "upscaling_speed": 1.0, "idle_timeout_minutes": 5.0,
            "provider": provider,
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.head_cpus}, "node_config": {}, "max_workers": 0},
                NODE_TYPE: {"resources": {"CPU": self.node_cpus, SLOT: 1, "object_store_memory": store}, "node_config": {},
                            "min_workers": 0, "max_workers": self.max_nodes},
            },
            "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }

    def start(self) -> FakeAutoscalingCluster:
        from ray._private.services import get_node_ip_address
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

        port = _free_port()
        self.address = f"{get_node_ip_address()}:{port}"
        config = os.path.join(self.temp_dir, "autoscaling.json")
        with open(config, "w") as f:
            json.dump(self._config(self.address), f)
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
               "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}
        env.pop("RAY_ADDRESS", None)
        # a killed raylet refuses connections, so its 1 s health checks fail at once: the GCS marks its node dead after 5
        # (seconds, not minutes; the autoscaler then replaces it). A live raylet that a busy 2-core machine keeps waiting
        # gets 10 s per check (Ray's default), so contention alone does not get a live node declared dead
        system = {"health_check_period_ms": 1000, "health_check_timeout_ms": 10000, "health_check_failure_threshold": 5}
        command = [
            str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
            f"--autoscaling-config={config}", f"--num-cpus={self.head_cpus}", "--object-store-memory=150000000",
            "--include-dashboard=false", f"--dashboard-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
            f"--ray-client-server-port={_free_port()}", f"--system-config={json.dumps(system)}", "--disable-usage-stats",
        ]
        with open(os.path.join(self.temp_dir, "ray-start.log"), "w") as log:
            process = subprocess.Popen(command, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            self.pgid = process.pid  # every process Ray starts stays in this group (workers: children of its raylets)
            code = process.wait(timeout=300)
        if code != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({code}): {Path(self.temp_dir, 'ray-start.log').read_text()[-3000:]}")
        return self

    def pids(self) -> set[int]:
        """Every process of this cluster: its process group, their descendants, anything naming its temp dir."""
        table = _processes()
        mine = {pid for pid, (_, group) in table.items() if group == self.pgid}
        mine |= {pid for pid in table if self.temp_dir in _cmdline(pid)}
        return (mine | _descendants(mine, table)) - {os.getpid()}

    def stop(self) -> None:
        for _ in range(3):  # processes may still start while others die
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    fake = FakeAutoscalingCluster().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A toy pool of 48 samples in 3 shards and a random raymimic-tiny reference (made without Ray)."""
    import torch

    from raymimic.clip import create_model, save_checkpoint
    from raymimic_experiments.toy_pool import make_toy_pool

    root = tmp_path_factory.mktemp("autoscaling")
    make_toy_pool(str(root / "pool"), samples=POOL_SAMPLES, noise=0.3, seed=0, shard_size=16, eval_samples=0, workers=1)
    torch.manual_seed(1)
    reference = save_checkpoint(create_model(MODEL)[0], str(root / "reference.pt"), MODEL)
    return {"root": root, "pool": str(root / "pool"), "reference": reference}


def _drive(cluster: FakeAutoscalingCluster, job: dict, timeout: float) -> dict:
    """Run this file as a driver on ``cluster`` for ``job``; return what it reports."""
    out = Path(job["result"])
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAYMIMIC_FAKE_CLUSTER_TEMP_DIR": cluster.temp_dir}
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, __file__, json.dumps(job)], env=env, stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout, cwd=Path(__file__).parent.parent).returncode
    elapsed = time.perf_counter() - started
    tail = log.read_text()[-6000:]
    assert code == 0 and out.exists(), f"driver {job['phase']} failed ({code}) after {elapsed:.0f} s:\n{tail}"
    result = json.loads(out.read_text())
    result["driver_seconds"] = elapsed
    print(f"{job['phase']}: {elapsed:.0f} s")
    return result


def _check_exactly_once(scores: str, steps: int) -> None:
    from raymimic.score_table import read_score_table

    table = read_score_table(scores)
    pairs = list(zip(table["uid"].to_pylist(), table["step"].to_pylist()))
    assert len(pairs) == steps * BATCH, f"{len(pairs)} rows for {steps} steps of {BATCH}"
    assert len(set(pairs)) == len(pairs), "a (uid, step) pair appears twice"
    assert sorted(set(table["step"].to_pylist())) == list(range(steps))
    assert set(table["batch_size"].to_pylist()) == {BATCH}


def _job(inputs, phase: str, name: str, **values) -> dict:
    return {"phase": phase, "pool": inputs["pool"], "reference": inputs["reference"], "output": str(inputs["root"] / name),
            "result": str(inputs["root"] / f"{name}.json"), **values}


@pytest.fixture(scope="module")
def run(cluster, inputs):
    """2 workers that only autoscaled nodes can host, throttled data (>= 0.5 s a step); a trainer node's raylet is killed
    once the step-4 checkpoint is committed. One run serves both Stage 1 checks: a second one would add about two
    minutes of driver, worker and data start-up to the suite on a 2-core machine."""
    job = _job(inputs, "stage1", "run", samples_seen=STEPS * BATCH, checkpoint_every=4, max_failures=2, throttle_s=0.5,
               kill_after_checkpoint=4)
    return _drive(cluster, job, timeout=900)


@pytest.fixture(scope="module")
def stage2(cluster, inputs, run):
    return _drive(cluster, _job(inputs, "stage2", "stage2", scores=run["scores"]), timeout=600)


@pytest.mark.timeout(1200)
def test_workers_run_on_nodes_the_autoscaler_adds(run):
    assert run["slots_before"] == 0, "the head must not be able to host a training worker"
    assert run["autoscaler_ceiling"] is None, "Ray 2.60's autoscaler reports no ceiling (get_max_resources_from_cluster_config)"
    assert run["preflight"] == {"autoscaling": True, "source": "unverified"}
    assert run["killed"] and len(run["killed"].get("trainer_nodes", [])) == 2, f"not two autoscaled nodes before the kill: {run}"
    assert len(run["trainer_nodes_after"]) == 2, run
    assert run["step"] == STEPS
    _check_exactly_once(run["scores"], STEPS)


@pytest.mark.timeout(1200)
def test_a_removed_node_is_replaced_and_the_run_resumes_exactly_once(run):
    killed = run["killed"]
    assert killed is not None, f"no trainer node was killed: {run}"
    assert not killed["run_had_finished"], "the node died after the run had finished: nothing was resumed"
    assert killed["node"] not in run["trainer_nodes_after"]
    # a ledger, Train controller or data split (DatasetManager, SplitCoordinator) on the victim would die with it,
    # and every retry of the run would then fail: they must all be on the driver's node, which outlives the job
    head = run["head"]
    for name in ("_Ledger", "TrainController", "DatasetManager", "SplitCoordinator"):
        assert killed["actors"].get(name) == [head], f"{name} not (only) on the driver's node {head} at the kill: {killed['actors']}"
    assert killed["dead_after_s"] is not None, f"the GCS never marked the killed node dead: {killed}"
    replacements = set(run["trainer_nodes_after"]) - set(killed["trainer_nodes"])
    assert replacements, f"no replacement node: before the kill {killed['trainer_nodes']}, after {run['trainer_nodes_after']}"
    assert run["step"] == STEPS
    _check_exactly_once(run["scores"], STEPS)
    # resumed from the committed checkpoint, not restarted: the rows of the steps before it are the first attempt's files
    from raymimic.score_table import parse_file_name

    written = {path.name: path.stat().st_mtime for path in Path(run["scores"]).glob("*.parquet")}
    before = [t for name, t in written.items() if parse_file_name(name)[1] < killed["committed_step"]]
    assert before and max(before) < killed["at"], "rows of steps before the restored checkpoint were written again"
    assert max(written.values()) > killed["at"]


@pytest.mark.timeout(900)
def test_stage2_runs_on_the_cluster(stage2):
    assert stage2["n_rows"] == STEPS * BATCH
    assert stage2["n_uids"] == POOL_SAMPLES
    assert stage2["n_duplicate_rows"] == 0
    assert 0 < stage2["kept"] <= POOL_SAMPLES


@pytest.mark.timeout(900)
def test_pool_ledgers_stay_on_the_drivers_node_while_worker_nodes_are_up(stage2):
    # Ray puts an actor that needs no resources on a random alive node unless its node affinity is hard: with the
    # head and two trainer nodes up, a soft affinity would put all LEDGERS ledgers on the head once in 3 ** LEDGERS
    ledgers = stage2["ledgers"]
    assert len(ledgers["trainer_nodes"]) == 2, f"the trainer nodes were gone, the check means nothing: {ledgers}"
    assert ledgers["nodes"] == [ledgers["head"]] * LEDGERS, f"ledgers off the driver's node {ledgers['head']}: {ledgers}"


@pytest.mark.timeout(600)
def test_stage2_survives_a_node_lost_in_its_map_round(cluster, tmp_path):
    import pandas as pd
    from conftest import synthetic_scores
    from test_select_stream import spread_uids, write_files

    from raymimic.select.pipeline import FilterConfig, run_filter

    table, _ = synthetic_scores(n_samples=4000, batch=200, epochs=2)
    scores = write_files(spread_uids(table), tmp_path / "scores", parts=MAP_FILES)
    reference = tmp_path / "reference"
    run_filter(FilterConfig(scores, str(reference), method="ensemble"))  # uninterrupted, in this process (a small table)
    job = {"phase": "stage2_node_loss", "scores": scores, "output": str(tmp_path / "out"), "attempts": str(tmp_path / "attempts"),
           "result": str(tmp_path / "node_loss.json")}
    os.makedirs(job["attempts"])
    result = _drive(cluster, job, timeout=420)

    killed = result["killed"]
    assert killed is not None and "error" not in killed, f"no trainer node was killed mid-map: {killed}"
    assert killed["in_flight"], f"the killed node ran no map task: {killed}"
    assert killed["dead_after_s"] is not None, f"the GCS never marked the killed node dead: {killed}"
    attempts = result["attempts"]  # task -> the nodes its attempts started on
    assert sorted(attempts) == [f"t{i:05d}.bin" for i in range(MAP_FILES)]
    assert result["head"] not in {node for nodes in attempts.values() for node in nodes}, "a map task ran on the head"
    for task in killed["in_flight"]:  # each task the node was running started again, and ended elsewhere
        assert killed["node"] in attempts[task][:-1], f"{task} was not re-run after the kill: {attempts[task]}"
    rerun = sum(len(nodes) - 1 for nodes in attempts.values())
    print(f"node lost in the map round: {len(killed['in_flight'])} map tasks in flight on it, {rerun} of {MAP_FILES} re-run "
          f"(Ray attempts {sum(map(len, attempts.values()))}); node dead after {killed['dead_after_s']} s; "
          f"driver {result['driver_seconds']:.0f} s")

    stage2 = result["summary"]["mimic"]["stage2_tasks"]
    assert not stage2["in_process"]
    assert stage2["rounds"]["map"] == {"tasks": MAP_FILES, "run": MAP_FILES, "committed_before": 0}  # one run, Ray did the retries
    out = Path(job["output"])
    assert (out / "keep.npy").read_bytes() == (reference / "keep.npy").read_bytes()
    decisions, expected = pd.read_parquet(out / "decisions.parquet"), pd.read_parquet(reference / "decisions.parquet")
    assert decisions["uid"].is_unique and len(decisions) == result["summary"]["n_decisions"] == 4000
    # the rows' order follows the partition count, which is the cluster's CPU count here and 1 in process
    pd.testing.assert_frame_equal(decisions.sort_values("uid", ignore_index=True), expected.sort_values("uid", ignore_index=True))
    assert not (out / "_stage2_tmp").exists()


# ----------------------------------------------------------------------------- the drivers (subprocesses)


def _throttle(batch: dict, seconds: float) -> dict:
    time.sleep(seconds)
    return batch


def _trainer_nodes() -> list[str]:
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get(SLOT))


def _job_actors(states: tuple[str, ...] = ("ALIVE",)) -> dict[str, list[str]]:
    """Class name -> the nodes of this job's actors in ``states``, from the GCS's actor table."""
    import ray
    from ray._private.state import state

    job, placed = ray.get_runtime_context().get_job_id(), {}
    for info in state.actor_table(None).values():
        if info["JobID"] == job and info["State"] in states:
            placed.setdefault(info["ActorClassName"], set()).add(info["Address"]["NodeID"])
    return {name: sorted(nodes) for name, nodes in placed.items()}


def _raylet_pid(node_id: str) -> int | None:
    temp_dir = os.environ["RAYMIMIC_FAKE_CLUSTER_TEMP_DIR"]
    for pid in _processes():
        command = _cmdline(pid)
        if "/raylet/raylet " in command and f"--node_id={node_id}" in command and temp_dir in command:
            return pid
    return None


def _committed_step(output: str) -> int:
    """The step of the latest checkpoint Ray Train has committed (its checkpoint manager snapshot), -1 if none."""
    try:
        snapshot = json.loads((Path(output) / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return -1


def _kill_a_trainer_node(output: str, step: int, done, report: dict) -> None:
    """Once the checkpoint of ``step`` is committed, SIGKILL the raylet of a trainer node that is not the driver's."""
    import ray

    while _committed_step(output) < step:
        if done.is_set():
            return
        time.sleep(0.1)
    own = ray.get_runtime_context().get_node_id()  # the Train controller and the data split live here
    nodes = _trainer_nodes()
    victims = [n for n in nodes if n != own]
    pid = _raylet_pid(victims[0]) if victims else None
    if pid is None:
        report["killed"] = {"error": f"no raylet to kill among {nodes}"}
        return
    actors = _job_actors()
    os.kill(pid, signal.SIGKILL)
    killed = report["killed"] = {"node": victims[0], "pid": pid, "trainer_nodes": nodes, "run_had_finished": done.is_set(),
                                 "at": time.time(), "committed_step": _committed_step(output), "actors": actors,
                                 "dead_after_s": None}
    print(f"killed the raylet (pid {pid}) of node {victims[0]} after the step-{step} checkpoint; actors then: {actors}", flush=True)
    while time.time() - killed["at"] < 120:  # how long the GCS takes to declare it dead (its health checks)
        if not any(n["NodeID"] == victims[0] and n.get("Alive") for n in ray.nodes()):
            killed["dead_after_s"] = round(time.time() - killed["at"], 1)
            print(f"node {victims[0]} marked dead {killed['dead_after_s']} s after the kill", flush=True)
            break
        time.sleep(0.5)


def _stage1(job: dict) -> dict:
    import threading

    import ray
    from ray._private.state import state

    from raymimic.clip.models import transforms_for_model
    from raymimic.data.pool import PoolRejects
    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.train import preflight
    from raymimic.train.config import TrainConfig
    from raymimic.train.trainer import fit

    report: dict = {"slots_before": ray.cluster_resources().get(SLOT, 0),
                    "autoscaler_ceiling": state.get_max_resources_from_cluster_config()}
    view = preflight.current_cluster()
    cfg = TrainConfig(
        output=job["output"], model=MODEL, reference=job["reference"], weighting="grad-mimic", tau=0.5, samples_seen=job["samples_seen"],
        global_batch=BATCH, lr=1e-3, warmup=2, workers=2, cpus_per_worker=1, checkpoint_every=job["checkpoint_every"],
        score_flush_every=1, log_every=1, progress=False, max_failures=job["max_failures"],
        resources_per_worker={SLOT: 1},
    )
    report["preflight"] = {"autoscaling": view.autoscaling, "source": preflight.check_resources(cfg, cluster=view).source}
    rejects = PoolRejects()
    dataset = clip_training_dataset(job["pool"], *transforms_for_model(MODEL), rejects=rejects)
    rejects.summary()  # waits for the ledger actor to be placed
    report["head"] = ray.get_runtime_context().get_node_id()
    report["ledger_nodes"] = _job_actors().get("_Ledger")
    print(f"driver on {report['head']}, ledger on {report['ledger_nodes']}, trainer nodes {_trainer_nodes()}", flush=True)
    if job.get("throttle_s"):
        dataset = dataset.map_batches(_throttle, batch_size=BATCH, batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=1),
                                      fn_kwargs={"seconds": job["throttle_s"]})
    done, killer = threading.Event(), None
    report["killed"] = None
    if job.get("kill_after_checkpoint"):
        killer = threading.Thread(target=_kill_a_trainer_node, args=(job["output"], job["kill_after_checkpoint"], done, report),
                                  daemon=True)
        killer.start()
    started = time.time()
    try:
        summary = fit(cfg, dataset, pool=job["pool"])
    except BaseException:
        # where everything was, for the log tail that a failed driver leaves in the assertion message
        print(f"run failed; actors by node: {_job_actors(('ALIVE', 'RESTARTING', 'DEAD'))}; "
              f"nodes: {[(n['NodeID'], n.get('Alive')) for n in ray.nodes()]}; killed: {report['killed']}", flush=True)
        raise
    finally:
        done.set()
    report.update(seconds=time.time() - started, step=summary.metrics.get("step"), scores=summary.scores,
                  trainer_nodes_after=_trainer_nodes())
    return report


def _ledger_nodes(pool: str) -> dict:
    """Where LEDGERS pool reads put their ledger actors (read_pool is lazy: it binds the ledger and reads nothing yet)."""
    import ray
    from ray._private.state import state

    from raymimic.data.pool import PoolRejects, read_pool

    nodes = []
    for _ in range(LEDGERS):
        rejects = PoolRejects(print_summary=False)
        read_pool(pool, rejects=rejects)
        rejects.summary()  # waits for the actor to be placed
        nodes.append(state.actor_table(rejects.actor._actor_id.hex())["Address"]["NodeID"])
    return {"head": ray.get_runtime_context().get_node_id(), "trainer_nodes": _trainer_nodes(), "nodes": nodes}


def _stage2(job: dict) -> dict:
    from raymimic.select.mimic_filter import MimicFilter

    ledgers = _ledger_nodes(job["pool"])  # first: the trainer nodes of the Stage 1 run idle out after minutes
    mimic = MimicFilter(job["scores"], method="gmm").fit()
    return {"n_rows": mimic.stats["n_rows"], "n_uids": mimic.stats["n_uids"], "n_duplicate_rows": mimic.stats["n_duplicate_rows"],
            "kept": mimic.apply().count(), "ledgers": ledgers}


def _recording(attempts: str, seconds: float):
    """``tasks.map_files`` that first records its attempt (a file ``<task>+<node>+<id>`` in ``attempts``, its time the
    start), then waits ``seconds``; pickled by value into the workers, where the module is not patched."""
    def map_files(*args):
        import uuid

        import ray

        from raymimic.select.executors import tasks

        started = f"{Path(args[5]).name}+{ray.get_runtime_context().get_node_id()}+{uuid.uuid4().hex}"
        Path(attempts, started).touch()
        time.sleep(seconds)
        return tasks.map_files(*args)

    return map_files


def _attempts(attempts: str, since: float = 0.0) -> dict[str, list[str]]:
    """Map task -> the nodes its attempts started on (after ``since``, a time), in the order they started."""
    started = sorted((path.stat().st_mtime, *path.name.split("+")[:2]) for path in Path(attempts).iterdir())
    nodes: dict[str, list[str]] = {}
    for at, task, node in started:
        if at > since:
            nodes.setdefault(task, []).append(node)
    return nodes


def _kill_a_node_mid_map(attempts: str, summaries: Path, done, report: dict) -> None:
    """Once a trainer node runs two map tasks (or one, a second later), lose that node: SIGKILL its raylet and every
    process under it (its workers: a worker whose raylet alone died would finish its task and return the result). A task
    counts as running there when its attempt started less than half its wait ago (and has not committed): it still waits."""
    import ray

    first_seen = None
    while True:
        if done.is_set():
            report["killed"] = {"error": "the map round ended before a task was caught in flight"}
            return
        committed = {path.name.removesuffix(".pkl") for path in summaries.glob("t*.bin.pkl")}  # kept until the run ends
        in_flight: dict[str, list[str]] = {}
        for task, nodes in _attempts(attempts, since=time.time() - MAP_SECONDS / 2).items():
            if task not in committed:
                in_flight.setdefault(nodes[-1], []).append(task)
        if in_flight:  # wait a little for a node running two (as many as it hosts), to lose more work
            first_seen = first_seen or time.time()
            if max(map(len, in_flight.values())) >= 2 or time.time() - first_seen > MAP_SECONDS / 5:
                break
        time.sleep(0.05)
    victim = max(in_flight, key=lambda node: len(in_flight[node]))
    pid, nodes = _raylet_pid(victim), _trainer_nodes()
    if pid is None:
        report["killed"] = {"error": f"no raylet to kill for node {victim} among {nodes}"}
        return
    processes = [pid, *_descendants({pid}, _processes())]
    for process in processes:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed = report["killed"] = {"node": victim, "processes": processes, "in_flight": sorted(in_flight[victim]), "trainer_nodes": nodes,
                                 "at": time.time(), "dead_after_s": None}
    print(f"killed the raylet (pid {pid}) of node {victim} and its {len(processes) - 1} processes while it ran "
          f"{killed['in_flight']}", flush=True)
    while time.time() - killed["at"] < 120:
        if not any(n["NodeID"] == victim and n.get("Alive") for n in ray.nodes()):
            killed["dead_after_s"] = round(time.time() - killed["at"], 1)
            break
        time.sleep(0.5)


def _stage2_node_loss(job: dict) -> dict:
    """Stage 2 on Ray tasks that need half a trainer slot (so only trainer nodes host them, two at a time), one map task per
    file, each attempt recorded and slowed; a trainer node is lost while it runs map tasks."""
    import threading

    import ray

    from raymimic.select.executors import tasks
    from raymimic.select.pipeline import FilterConfig, run_filter

    tasks.LOCAL_ROWS = 0  # Ray tasks even for this small table
    tasks.ROWS_PER_TASK = 1  # one map task per file
    tasks.map_files = _recording(job["attempts"], MAP_SECONDS)
    report: dict = {"head": ray.get_runtime_context().get_node_id(), "killed": None}
    done = threading.Event()
    killer = threading.Thread(target=_kill_a_node_mid_map, daemon=True,
                              args=(job["attempts"], Path(job["output"], "_stage2_tmp", "summaries"), done, report))
    killer.start()
    try:
        summary = run_filter(FilterConfig(job["scores"], job["output"], method="ensemble", task_resources={SLOT: 0.5}))
    finally:
        done.set()
    killer.join(timeout=150)
    report.update(summary=summary, attempts=_attempts(job["attempts"]), trainer_nodes_after=_trainer_nodes())
    return report


def _main(job: dict) -> None:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    result = {"stage1": _stage1, "stage2": _stage2, "stage2_node_loss": _stage2_node_loss}[job["phase"]](job)
    Path(job["result"]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
