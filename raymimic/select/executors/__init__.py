"""Executors of the mimic filter's rounds: they move rows to the kernels of :mod:`raymimic.select.kernels`.

- :mod:`~raymimic.select.executors.local`: a pandas DataFrame, in this process;
- :mod:`~raymimic.select.executors.dataset`: a Ray Dataset, with ``map_batches`` and a hash repartition on ``uid``;
- :mod:`~raymimic.select.executors.tasks`: a score-table URI, with plain Ray tasks over its files and a spill folder.

Each takes the filter (its settings, and the combining and fitting steps between rounds) and
returns an :class:`Outcome`; none computes anything the kernels do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Outcome:
    """What an executor hands back to the filter: the per-uid decisions and what it learnt on the way."""

    decisions: Any  # a DataFrame (local), a Dataset, or None when ``parts`` hold them
    threshold: float | None = None  # top-fraction's cut of mimic_score
    stats: dict = field(default_factory=dict)  # merged into the filter's stats
    parts: Any = None  # the task executor: the decision parts, readable on the driver
    spill: Any = None  # the task executor: the folder holding them
