"""Build and run Stage 1 as a Ray Train ``TorchTrainer``.

The dataset (columns ``uid`` str, ``image`` float32 CxHxW, ``text`` int64 tokens) is split
across workers by Ray Train with ``preserve_order=True``: the split is then deterministic, so
a resumed attempt sees the same batches as the one that failed (same worker count).

:func:`fit` runs :func:`raymimic.train.preflight.preflight` first: settings, model, reference,
pool and output are checked on the driver, and the cluster must hold (or be able to autoscale
to) the workers plus the CPUs Ray Data needs to feed them, so a mistake or a run that would
wait forever ends at once with a ``ValueError`` that says what to change.

:func:`run_training` is the same on the pool a config names.
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

from raymimic.train.config import TrainConfig


@dataclass
class RunSummary:
    output: str
    scores: str
    final_checkpoint: str
    ray_checkpoint: str | None
    metrics: dict


def normalise_output(uri: str) -> str:
    """Workers write to the output too: make local paths absolute."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def build_trainer(cfg: TrainConfig, dataset):
    from ray.data import DataContext
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymimic.train import loop
    from raymimic.train.preflight import worker_resources

    cfg.output = normalise_output(cfg.output)
    if cfg.min_workers is not None or cfg.max_workers is not None:
        workers = (cfg.min_workers or 1, cfg.max_workers or cfg.workers)
    else:
        workers = cfg.workers
    resources = worker_resources(cfg)  # CPU, GPU when use_gpu, and cfg.resources_per_worker
    # the context's options as DataConfig.default_ingest_options() takes them, without its deprecated exclude_resources setter
    options = copy.copy(DataContext.get_current().execution_options)
    options.preserve_order = True  # deterministic split and order: exact resume
    return TorchTrainer(
        # the loop function travels to the workers pickled: a fault a test injected on the driver travels with it
        functools.partial(loop.train_loop_per_worker, crash=loop.injected_crash),
        train_loop_config=cfg.to_dict(),
        torch_config=TorchConfig(timeout_s=max(1, round(cfg.collective_timeout_s))),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=cfg.output,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=options),
    )


def fit(cfg: TrainConfig, dataset, *, pool: str | None = None, data_cpus: float | None = None, validate: bool = True,
        check_resources: bool = True) -> RunSummary:
    """Train (resuming from ``<output>/<run_name>`` when a previous attempt left checkpoints).

    First :func:`raymimic.train.preflight.preflight` (``PreflightError``, a ``ValueError``, on a
    mistake): ``pool`` (default ``cfg.pool`` when the config has one) is the pool ``dataset`` was
    read from, checked for shards; ``data_cpus`` CPUs (default 1) must stay free for the Ray Data
    tasks that produce ``dataset``; ``validate=False`` skips the settings/input checks (for a
    caller that ran :func:`~raymimic.train.preflight.check_run` already), ``check_resources=False``
    the cluster check.
    """
    from raymimic.train.preflight import DATA_CPUS, preflight

    cfg.output = normalise_output(cfg.output)
    if pool is None:
        pool = getattr(cfg, "pool", None)
    preflight(cfg, pool=pool, data_cpus=DATA_CPUS if data_cpus is None else data_cpus, validate=validate,
              resources=check_resources)
    result = _fit_with_restarts(cfg, dataset)
    if result.error is not None:
        raise result.error
    return RunSummary(
        output=cfg.output,
        scores=cfg.scores_dir,
        final_checkpoint=f"{cfg.checkpoints_dir}/final.pt",
        ray_checkpoint=_checkpoint_uri(result.checkpoint, cfg.output),
        metrics=dict(result.metrics or {}),
    )


def run_training(cfg: TrainConfig, *, validate: bool = True) -> RunSummary:
    """Stage 1 on the pool ``cfg.pool``: :func:`fit` on its CLIP training dataset (``validate`` as :func:`fit` takes it).

    Needs a running (or startable) Ray.
    """
    from raymimic.clip.models import transforms_for_model
    from raymimic.data.preprocess import clip_training_dataset

    if not cfg.pool:
        raise ValueError("TrainConfig.pool is not set: give the DataComp pool to train on (or call fit() with a dataset)")
    # uint8 pixels through the object store; the workers normalise them on their device (raymimic.train.feed)
    return fit(cfg, clip_training_dataset(cfg.pool, *transforms_for_model(cfg.model), pixels=True), validate=validate)


# Ray's own scheduling failing under us, not the training code: Ray Train's controller gives up on
# these (its failure policy allows no controller errors), but the run can resume from its checkpoint
_INFRASTRUCTURE_ERRORS = ("placement group was removed",)


def _fit_with_restarts(cfg: TrainConfig, dataset):
    """``TorchTrainer.fit()``; a run that Ray's scheduling (not the training code) ended is resumed up to ``max_failures`` times."""
    import logging

    import ray.train

    for attempt in range(cfg.max_failures + 1):
        try:
            return build_trainer(cfg, dataset).fit()
        except ray.train.ControllerError as err:
            if attempt == cfg.max_failures or not any(text in str(err) for text in _INFRASTRUCTURE_ERRORS):
                raise
            logging.getLogger(__name__).warning("Ray removed the run's resources (%s); resuming from the latest checkpoint "
                                                "(restart %d of %d)", str(err).splitlines()[0], attempt + 1, cfg.max_failures)
    raise AssertionError("unreachable")


def _checkpoint_uri(checkpoint, output: str) -> str | None:
    """Ray reports checkpoint paths without the scheme (``bucket/run/...``): give it back the output's."""
    if checkpoint is None:
        return None
    path = checkpoint.path
    if "://" in output and "://" not in path:
        return f"{output.split('://', 1)[0]}://{path.lstrip('/')}"
    return path
