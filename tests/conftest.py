"""Shared fixtures. One local Ray instance serves the whole session: starting Ray and
TorchTrainer.fit() cost seconds each on a small machine, so tests share it."""
from __future__ import annotations

import os

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
