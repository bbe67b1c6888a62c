"""Shared fixtures and helpers. One local Ray instance serves the whole session: starting Ray and
TorchTrainer.fit() cost seconds each on a small machine, so tests share it. Test modules import
the helpers (synthetic score tables, a spawned worker's gloo group) with ``from conftest import ...``."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import pandas as pd
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # more logical CPUs than cores: 2 train workers plus Ray Data stages must fit at once
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray


def synthetic_scores(n_samples=1200, batch=40, epochs=2, noise=0.4, tau=0.05, scale_from=5.0, scale_to=0.05, seed=0):
    """A bimodal score table: clean samples score ~ +1, noisy ~ -1 (times a drifting scale).

    tau is small relative to the scores, so softmax weights are heavy tailed; the score
    scale shrinks 100x across training, as gradients do.
    """
    rng = np.random.default_rng(seed)
    uids = np.array([f"{i:032x}" for i in range(n_samples)])
    noisy = rng.random(n_samples) < noise
    steps_per_epoch = n_samples // batch
    scales = np.geomspace(scale_from, scale_to, steps_per_epoch * epochs)
    rows = []
    for epoch in range(epochs):
        order = rng.permutation(n_samples)
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            idx = order[s * batch:(s + 1) * batch]
            score = (np.where(noisy[idx], -1.0, 1.0) + 0.45 * rng.standard_normal(len(idx))) * scales[step]
            logits = score / tau
            weight = np.exp(logits - logits.max())
            weight /= weight.sum()
            rows.append(pd.DataFrame({"uid": uids[idx], "step": np.int64(step), "epoch": np.int32(epoch), "rank": np.int32(0),
                                      "score": score.astype(np.float32), "weight": weight.astype(np.float32),
                                      "batch_size": np.int32(batch)}))
    return pd.concat(rows, ignore_index=True), dict(zip(uids, noisy))


def lift_table(n_samples=400, batch=40, epochs=2, noise=0.4, zero="random", uniform=False, tau=0.5, seed=0):
    """Score rows with ``score``, ``score_zero`` and ``score_fixed``, and the ground truth (``uid``, ``is_noisy``).

    ``score`` separates noisy (about -1) from clean (about +1) samples perfectly; ``score_fixed`` is
    ``score`` plus noise (a reference variant). ``zero="random"``: the zero control is pure noise;
    ``"flipped"``: ``-2 * score + 1``, as good a detector with the opposite sign. Weights are
    ``softmax(score / tau)`` over each step, or ``1/B`` with ``uniform``.
    """
    rng = np.random.default_rng(seed)
    uids = np.array([f"{i:032x}" for i in range(n_samples)])
    noisy = rng.random(n_samples) < noise
    steps_per_epoch = n_samples // batch
    rows = []
    for epoch in range(epochs):
        order = rng.permutation(n_samples)
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            score = np.where(noisy[idx], -1.0, 1.0) + 0.1 * rng.standard_normal(len(idx))
            zero_score = rng.standard_normal(len(idx)) if zero == "random" else -2 * score + 1
            logits = score / tau
            weight = np.full(len(idx), 1 / len(idx)) if uniform else np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            rows.append(pd.DataFrame({
                "uid": uids[idx], "step": np.int64(epoch * steps_per_epoch + s), "epoch": np.int32(epoch), "rank": np.int32(0),
                "score": score.astype(np.float32), "weight": weight.astype(np.float32), "batch_size": np.int32(batch),
                "score_fixed": (score + 0.5 * rng.standard_normal(len(idx))).astype(np.float32),
                "score_zero": zero_score.astype(np.float32)}))
    return pd.concat(rows, ignore_index=True), pd.DataFrame({"uid": uids, "is_noisy": noisy})


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A ``torch.multiprocessing.spawn`` worker's gloo process group (one torch thread), destroyed on the way out."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
