"""Checks a Stage-1 run before Ray starts work on it: settings, inputs, output and cluster resources.

Two entry points, both raising :class:`PreflightError` (a ``ValueError``) whose one-line message
names the parameter at fault and what would be valid:

- :func:`check_run` needs no Ray: tau, the global batch against the worker count(s), the model
  name, the mimic layer (resolved on a weightless ``meta``-device copy of the model), the
  reference (loaded once with :func:`raymimic.clip.load_reference`, which names every tensor
  whose shape differs), the initial weights, the pool (``shards/*.tar``) and the output (a marker
  file written and deleted through fsspec). Mistakes are reported once, on the driver, instead of
  as worker tracebacks retried ``max_failures`` times.
- :func:`check_resources` compares what the run asks for, ``workers x resources per worker``
  plus ``data_cpus`` CPUs for the Ray Data tasks that read and preprocess the pool, with what the
  cluster has (per node) or can autoscale to. Ray Train 2.60 registers its workers' resources
  with Ray Data's autoscaling coordinator at high priority, so Ray Data runs on what is left: when
  nothing is left (2 workers x 1 CPU on a 2-CPU machine), training would wait forever for its
  first batch. Each of raymimic's read/preprocess tasks asks for one CPU, so one node must keep a
  whole CPU free (``data_cpus`` defaults to 1).

:func:`preflight` runs both; :func:`raymimic.train.trainer.fit` calls it before building the trainer.
"""
from __future__ import annotations

import json
import logging
import math
import uuid
from dataclasses import dataclass, field

from raymimic.train.config import TrainConfig

log = logging.getLogger(__name__)

DATA_CPUS = 1.0  # CPUs left free for Ray Data's read/preprocess tasks
DATA_TASK_CPUS = 1.0  # what one of raymimic's read/preprocess tasks asks for (Ray's default num_cpus)
_CPU_STEP = 0.05  # granularity of a suggested cpus_per_worker


class PreflightError(ValueError):
    """A setting, input or cluster that cannot work; the message says what to change."""


# ----------------------------------------------------------------------------- settings


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources of one training worker: CPU, GPU (``use_gpu``) and ``cfg.resources_per_worker``."""
    resources = {"CPU": float(cfg.cpus_per_worker)}
    if cfg.use_gpu:
        resources["GPU"] = 1.0
    resources.update({name: amount for name, amount in cfg.resources_per_worker.items() if amount})
    return resources


def world_sizes(cfg: TrainConfig) -> list[int]:
    """Every number of workers the run may train with (a range for elastic training)."""
    if cfg.min_workers is not None or cfg.max_workers is not None:
        low, high = cfg.min_workers or 1, cfg.max_workers or cfg.workers
        if not 1 <= low <= high:
            raise PreflightError(f"elastic training needs 1 <= min_workers <= max_workers, got min_workers={low}, max_workers={high}")
        return list(range(low, high + 1))
    if cfg.workers < 1:
        raise PreflightError(f"workers must be >= 1, got {cfg.workers}")
    return [cfg.workers]


def check_settings(cfg: TrainConfig, data_cpus: float = DATA_CPUS) -> None:
    """The checks that need neither files nor models."""
    from raymimic.mimic.weighting import WEIGHTINGS

    if not cfg.tau > 0:
        raise PreflightError(f"tau (the softmax temperature of the weights) must be > 0, got {cfg.tau}")
    if cfg.weighting not in WEIGHTINGS:
        raise PreflightError(f"weighting {cfg.weighting!r} is not one of {sorted(WEIGHTINGS)}")
    if cfg.precision == "amp_bf16" and not cfg.use_gpu:
        raise PreflightError("precision 'amp_bf16' needs GPU workers (use_gpu, --gpu); use 'auto' or 'fp32' on CPU workers")
    if not cfg.cpus_per_worker >= 0:
        raise PreflightError(f"cpus_per_worker must be >= 0, got {cfg.cpus_per_worker}")
    if not data_cpus >= 0:
        raise PreflightError(f"data_cpus (CPUs left for the Ray Data read/preprocess tasks) must be >= 0, got {data_cpus}")
    sizes = world_sizes(cfg)
    bad = [n for n in sizes if cfg.global_batch % n]
    if bad and len(sizes) == 1:
        n = sizes[0]
        divisors = [d for d in range(1, min(cfg.global_batch, 4 * n) + 1) if cfg.global_batch % d == 0]
        raise PreflightError(
            f"global_batch {cfg.global_batch} is not divisible by workers={n} (each worker trains on global_batch / workers "
            f"samples): use a global_batch that is a multiple of {n} (e.g. {math.ceil(cfg.global_batch / n) * n}) "
            f"or workers in {divisors}"
        )
    if bad:
        multiple = math.lcm(*sizes)
        raise PreflightError(
            f"global_batch {cfg.global_batch} is not divisible by {bad} of the worker counts elastic training may run with "
            f"(min_workers={sizes[0]} .. max_workers={sizes[-1]}): use a global_batch that is a multiple of {multiple} "
            f"(e.g. {math.ceil(cfg.global_batch / multiple) * multiple}) or a narrower min_workers/max_workers range"
        )


# ----------------------------------------------------------------------------- model and inputs


def _skeleton(model_name: str):
    """The open_clip model without memory for its weights (``meta`` device); a CPU copy if that fails."""
    import open_clip
    import torch

    from raymimic.clip.models import register_model_configs

    register_model_configs()
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded: none are wanted
    try:
        try:
            with torch.device("meta"):
                return open_clip.create_model(model_name, device="meta")
        except Exception:  # an architecture that cannot be built on meta: build it for real
            return open_clip.create_model(model_name)
    finally:
        logging.disable(previous)


def check_model(cfg: TrainConfig) -> str:
    """The model name and the mimic layer; returns the mimic layer's parameter name."""
    from raymimic.clip.layers import ALIASES, resolve_mimic_layer
    from raymimic.clip.models import check_model_name
    from raymimic.mimic.params import get_parameter

    try:
        check_model_name(cfg.model)
    except ValueError as error:
        raise PreflightError(f"model: {error}") from None
    model = _skeleton(cfg.model)
    matrices = [n for n, p in model.named_parameters() if p.ndim == 2]
    valid = f"valid: an alias ({', '.join(ALIASES)}) or a 2-D parameter name of {cfg.model} such as {matrices[-2:]}"
    try:
        name = resolve_mimic_layer(model, cfg.mimic_layer)
    except (KeyError, ValueError, AttributeError) as error:
        detail = error.args[0] if error.args else error
        raise PreflightError(f"mimic_layer {cfg.mimic_layer!r} does not resolve on model {cfg.model}: {detail}; {valid}") from None
    shape = tuple(get_parameter(model, name).shape)
    if len(shape) != 2:
        raise PreflightError(f"mimic_layer {cfg.mimic_layer!r} is {name} of shape {shape}, not a 2-D weight matrix; {valid}")
    return name


def check_reference(cfg: TrainConfig) -> None:
    """The reference loads and has the trained architecture (``load_reference`` names differing tensors)."""
    from raymimic.clip.models import load_reference

    if cfg.reference is None:
        if cfg.weighting in ("grad-mimic", "rho"):
            raise PreflightError(f"reference is required by weighting {cfg.weighting!r}: MODEL:TAG, a pretrained tag, "
                                 "a checkpoint path or URI")
        return
    try:
        load_reference(cfg.reference, cfg.model)
    except Exception as error:  # missing file, unknown tag, wrong architecture, unreadable checkpoint
        detail = error.args[0] if isinstance(error, (OSError, KeyError)) and error.args else error
        named = "reference: " if cfg.reference in str(detail) else f"reference {cfg.reference!r}: "
        raise PreflightError(f"{named}{detail}") from None


def check_pretrained(cfg: TrainConfig) -> None:
    """Initial weights given as a path or URI exist (tags are left to open_clip)."""
    import fsspec
    import open_clip

    from raymimic.clip.models import register_model_configs

    if not cfg.pretrained:
        return
    register_model_configs()
    if cfg.pretrained in open_clip.list_pretrained_tags_by_model(cfg.model):
        return
    try:
        fs, path = fsspec.core.url_to_fs(cfg.pretrained)
        exists = fs.exists(path)
    except Exception as error:
        raise PreflightError(f"pretrained {cfg.pretrained!r} cannot be opened: {error}") from None
    if not exists:
        tags = open_clip.list_pretrained_tags_by_model(cfg.model)
        raise PreflightError(f"pretrained {cfg.pretrained!r} is neither an existing checkpoint path/URI nor a pretrained tag of "
                             f"{cfg.model} (tags: {tags})")


def check_pool(pool: str) -> int:
    """The pool exists and has tar shards (``POOL/shards/*.tar``); returns their number."""
    from raymimic.data.pool import shard_files

    try:
        return len(shard_files(pool))
    except Exception as error:
        detail = error.args[0] if isinstance(error, OSError) and error.args else error
        raise PreflightError(f"pool: {detail}") from None


def check_output(output: str) -> None:
    """Workers can write under ``output``: a marker file is created and deleted through fsspec."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(output)
    except Exception as error:
        raise PreflightError(f"output {output!r} cannot be opened: {error}") from None
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "memory" in protocols:
        raise PreflightError(f"output {output!r} is on fsspec's process-local memory filesystem, which Ray workers cannot see; "
                             "use a local path, s3://, gs:// or another shared store")
    marker = f"{path.rstrip('/')}/.raymimic-preflight-{uuid.uuid4().hex}"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(marker, "wb") as f:
            f.write(b"raymimic checks that the run can write here\n")
        fs.rm(marker)
    except Exception as error:
        raise PreflightError(f"output {output!r} is not writable: {type(error).__name__}: {error}") from None


def check_run(cfg: TrainConfig, pool: str | None = None, data_cpus: float = DATA_CPUS) -> None:
    """Every check that needs no Ray, cheapest first; ``pool`` defaults to ``cfg.pool`` when the config has one.

    Raises :class:`PreflightError` (a ``ValueError``) naming the parameter and what is valid.
    """
    pool = pool if pool is not None else getattr(cfg, "pool", None)
    check_settings(cfg, data_cpus)
    check_model(cfg)
    if pool is not None:
        check_pool(pool)
    check_output(cfg.output)
    check_pretrained(cfg)
    check_reference(cfg)


# ----------------------------------------------------------------------------- cluster resources


@dataclass
class ClusterView:
    """What the cluster has (``nodes``: each alive node's total resources) and what it can grow to.

    ``max_resources``: the autoscaler's ceiling when the cluster reports one
    (``get_max_resources_from_cluster_config``, e.g. KubeRay); ``autoscaling``: an autoscaler with
    real node types runs, ceiling unknown (Ray's own autoscaler on a ``ray up`` cluster or
    ``AutoscalingCluster``: neither reports its ceiling in Ray 2.60).
    """

    nodes: list[dict[str, float]]
    max_resources: dict[str, float] | None = None
    autoscaling: bool = False

    @classmethod
    def single_node(cls, resources: dict[str, float]) -> ClusterView:
        return cls(nodes=[dict(resources)])

    @property
    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for name, amount in node.items():
                out[name] = out.get(name, 0.0) + amount
        return out

    def describe(self) -> str:
        cpus = self.total.get("CPU", 0)
        what = f"{_num(cpus)} CPU{'s' if cpus != 1 else ''} on {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"
        gpus = self.total.get("GPU", 0)
        return what + (f" and {_num(gpus)} GPUs" if gpus else "")


@dataclass
class ResourcePlan:
    """The outcome of :func:`check_resources`."""

    workers: int  # fewest workers the run trains with
    per_worker: dict[str, float]
    data_cpus: float
    needed: dict[str, float]  # workers x per_worker, plus data_cpus CPUs
    source: str  # "nodes" (checked per node), "autoscaler ceiling" (aggregate) or "unverified"
    notes: list[str] = field(default_factory=list)


def _num(value: float) -> str:
    return f"{value:g}"


def _autoscaler_running() -> bool:
    """Whether an autoscaler with real node types runs (Ray's readonly provider on a plain ``ray.init`` does not count)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2(fetch_from_server=True):  # opt-in (RAY_enable_autoscaler_v2=1): taken as autoscaling
            return True
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        if raw:  # autoscaler v1 (the default): the readonly provider names every node type "node_<node id>"
            report = json.loads(raw).get("autoscaler_report") or {}
            mapping = report.get("node_type_mapping") or {}
            return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())
    except Exception as error:  # status formats are internal to Ray: treat unknown as no autoscaler
        log.debug("could not read the autoscaler status: %s", error)
    return False


def current_cluster() -> ClusterView:
    """The connected Ray cluster (started with ``ray.init()`` when none is)."""
    import ray
    from ray._private.state import state

    if not ray.is_initialized():
        ray.init()
    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    try:
        ceiling = state.get_max_resources_from_cluster_config()
    except Exception as error:
        log.debug("no cluster config: %s", error)
        ceiling = None
    ceiling = {k: float(v) for k, v in ceiling.items()} if ceiling else None
    return ClusterView(nodes=nodes, max_resources=ceiling, autoscaling=ceiling is None and _autoscaler_running())


def _place(nodes: list[dict[str, float]], per_worker: dict[str, float], workers: int) -> list[dict[str, float]] | None:
    """Free resources per node after placing ``workers`` bundles (best fit), or None if one does not fit."""
    free = [dict(node) for node in nodes]
    for _ in range(workers):
        fits = [i for i, node in enumerate(free) if all(node.get(k, 0.0) + 1e-9 >= v for k, v in per_worker.items())]
        if not fits:
            return None
        best = min(fits, key=lambda i: free[i].get("CPU", 0.0))  # pack: keep the largest CPU holes for Ray Data
        for name, amount in per_worker.items():
            free[best][name] = free[best].get(name, 0.0) - amount
    return free


def _data_fits(free: list[dict[str, float]], data_cpus: float) -> bool:
    if data_cpus <= 0:
        return True
    cpus = [node.get("CPU", 0.0) for node in free]
    return sum(cpus) + 1e-9 >= data_cpus and max(cpus, default=0.0) + 1e-9 >= min(data_cpus, DATA_TASK_CPUS)


def _fits_nodes(nodes, per_worker, workers, data_cpus) -> bool:
    free = _place(nodes, per_worker, workers)
    return free is not None and _data_fits(free, data_cpus)


def _fits_total(total, per_worker, workers, data_cpus) -> bool:
    need = _needed(per_worker, workers, data_cpus)
    return all(total.get(k, 0.0) + 1e-9 >= v for k, v in need.items())


def _needed(per_worker: dict[str, float], workers: int, data_cpus: float) -> dict[str, float]:
    need = {name: amount * workers for name, amount in per_worker.items()}
    need["CPU"] = need.get("CPU", 0.0) + data_cpus
    return need


def _suggestions(cfg: TrainConfig, fits, per_worker: dict[str, float], workers: int, where: str) -> str:
    """What would fit: fewer workers, fewer CPUs per worker, a bigger cluster."""
    options = []
    if cfg.cpus_per_worker > 0:
        steps = int(round(cfg.cpus_per_worker / _CPU_STEP))
        for k in range(steps - 1, 0, -1):
            cpus = round(k * _CPU_STEP, 2)
            if fits({**per_worker, "CPU": cpus}, workers):
                options.append(f"cpus_per_worker={_num(cpus)} (--cpus-per-worker {_num(cpus)})")
                break
    elastic = cfg.min_workers is not None or cfg.max_workers is not None
    for n in range(workers - 1, 0, -1):
        if cfg.global_batch % n == 0 and fits(per_worker, n):
            name = "min_workers" if elastic else "workers"
            options.append(f"{name}={n} (--{name.replace('_', '-')} {n})")
            break
    options.append(where)
    return "; or ".join(options)


def _check_elastic_growth(cfg: TrainConfig, cluster: ClusterView, per_worker: dict[str, float], data_cpus: float) -> None:
    """Elastic training grows to as many workers as fit: on a fixed cluster it must not take the CPUs Ray Data needs."""
    sizes = world_sizes(cfg)
    if len(sizes) == 1:
        return
    placeable = [n for n in sizes if _place(cluster.nodes, per_worker, n) is not None]
    starving = [n for n in placeable if not _fits_nodes(cluster.nodes, per_worker, n, data_cpus)]
    if starving:
        fine = [n for n in placeable if n not in starving and cfg.global_batch % n == 0]
        fix = f"max_workers={fine[-1]} (--max-workers {fine[-1]})" if fine else "fewer CPUs per worker or a bigger cluster"
        keep = _num(min(data_cpus, DATA_TASK_CPUS))
        raise PreflightError(f"elastic training may grow to {starving[0]} workers on this cluster (it has {cluster.describe()}, "
                             f"no autoscaler), and {starving[0]} x {_num(per_worker['CPU'])} CPU leave no node with {keep} CPU "
                             f"free for the Ray Data tasks that feed them: training would wait forever. Use {fix}")


def check_resources(cfg: TrainConfig, data_cpus: float = DATA_CPUS, cluster: ClusterView | dict | None = None) -> ResourcePlan:
    """Can the cluster (now, or after autoscaling) run ``workers`` training workers AND feed them?

    ``cluster``: a :class:`ClusterView`, a dict of resources (one node), or None for the connected
    Ray cluster. Raises :class:`PreflightError` saying what to change when it cannot.
    """
    if isinstance(cluster, dict):
        cluster = ClusterView.single_node(cluster)
    cluster = cluster if cluster is not None else current_cluster()
    if not data_cpus >= 0:
        raise PreflightError(f"data_cpus (CPUs left for the Ray Data read/preprocess tasks) must be >= 0, got {data_cpus}")
    per_worker = worker_resources(cfg)
    workers = world_sizes(cfg)[0]
    needed = _needed(per_worker, workers, data_cpus)
    asks = " + ".join(f"{_num(amount)} {name}" for name, amount in per_worker.items())
    demand = (f"{workers} training worker{'s' if workers > 1 else ''} x ({asks}) + {_num(data_cpus)} CPU for the Ray Data "
              f"tasks that read and preprocess the pool = {', '.join(f'{_num(v)} {k}' for k, v in needed.items())}")

    if cluster.max_resources is not None:
        ceiling = {k: max(cluster.total.get(k, 0.0), cluster.max_resources.get(k, 0.0)) for k in {*cluster.total, *cluster.max_resources}}
        if _fits_total(ceiling, per_worker, workers, data_cpus):
            return ResourcePlan(workers, per_worker, data_cpus, needed, "autoscaler ceiling")
        short = " and ".join(f"{_num(ceiling.get(k, 0.0))} {k}" for k, v in needed.items() if ceiling.get(k, 0.0) + 1e-9 < v)
        fixes = _suggestions(cfg, lambda pw, n: _fits_total(ceiling, pw, n, data_cpus), per_worker, workers,
                             "raise the autoscaler's max nodes")
        raise PreflightError(f"not enough resources for Stage 1: it needs {demand}, but the autoscaler can grow the cluster "
                             f"to only {short}: use {fixes}")

    if cluster.autoscaling:
        note = (f"an autoscaler runs but does not report its maximum size: not checked that it can provide {demand}; "
                "Ray Train waits until it does")
        log.warning(note)
        return ResourcePlan(workers, per_worker, data_cpus, needed, "unverified", [note])

    if _fits_nodes(cluster.nodes, per_worker, workers, data_cpus):
        _check_elastic_growth(cfg, cluster, per_worker, data_cpus)
        return ResourcePlan(workers, per_worker, data_cpus, needed, "nodes")
    if _place(cluster.nodes, per_worker, workers) is None:
        problem = "the training workers alone do not fit on its nodes"
        total = cluster.total
        largest = {k: max((node.get(k, 0.0) for node in cluster.nodes), default=0.0) for k in per_worker}
        short = [f"{_num(workers * v)} {k} in all (it has {_num(total.get(k, 0.0))})" for k, v in per_worker.items()
                 if total.get(k, 0.0) + 1e-9 < workers * v]
        short += [f"{_num(v)} {k} on one node (the largest has {_num(largest[k])})" for k, v in per_worker.items()
                  if largest[k] + 1e-9 < v]
        if short:
            problem += f" (they need {'; '.join(short)})"
    else:
        problem = (f"after placing the training workers no node keeps {_num(min(data_cpus, DATA_TASK_CPUS))} CPU free, so the Ray Data "
                   "tasks feeding them could never run and training would wait forever for its first batch")
    fixes = _suggestions(cfg, lambda pw, n: _fits_nodes(cluster.nodes, pw, n, data_cpus), per_worker, workers,
                         "a bigger cluster (more nodes, or ray.init(num_cpus=...) / ray start --num-cpus on a larger machine)")
    raise PreflightError(f"not enough resources for Stage 1: it needs {demand}, but the Ray cluster has {cluster.describe()} "
                         f"and no autoscaler: {problem}. Use {fixes}")


def preflight(cfg: TrainConfig, pool: str | None = None, data_cpus: float = DATA_CPUS, *, validate: bool = True,
              resources: bool = True, cluster: ClusterView | dict | None = None) -> ResourcePlan | None:
    """:func:`check_run` (``validate``; a caller that ran it already passes False) then :func:`check_resources`
    (``resources``); what ``fit`` runs first."""
    if validate:
        check_run(cfg, pool=pool, data_cpus=data_cpus)
    return check_resources(cfg, data_cpus, cluster) if resources else None
