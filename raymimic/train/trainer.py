"""Build and run Stage 1 as a Ray Train ``TorchTrainer``.

The dataset (columns ``uid`` str, ``image`` float32 CxHxW, ``text`` int64 tokens) is split
across workers by Ray Train with ``preserve_order=True``: the split is then deterministic, so
a resumed attempt sees the same batches as the one that failed (same worker count).
"""
from __future__ import annotations

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
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymimic.train.loop import train_loop_per_worker

    cfg.output = normalise_output(cfg.output)
    if cfg.min_workers is not None or cfg.max_workers is not None:
        workers = (cfg.min_workers or 1, cfg.max_workers or cfg.workers)
    else:
        workers = cfg.workers
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    options = DataConfig.default_ingest_options()
    options.preserve_order = True  # deterministic split and order: exact resume
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
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


def fit(cfg: TrainConfig, dataset) -> RunSummary:
    """Train (resuming from ``<output>/<run_name>`` when a previous attempt left checkpoints)."""
    result = build_trainer(cfg, dataset).fit()
    if result.error is not None:
        raise result.error
    return RunSummary(
        output=cfg.output,
        scores=cfg.scores_dir,
        final_checkpoint=f"{cfg.checkpoints_dir}/final.pt",
        ray_checkpoint=result.checkpoint.path if result.checkpoint is not None else None,
        metrics=dict(result.metrics or {}),
    )
