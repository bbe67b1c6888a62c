"""The score table: the contract between Stage 1 and Stage 2, in one package.

- :mod:`raymimic.score_table.columns`: the score columns' vocabulary (``score``, the controls,
  reference variants and baselines, ``score_<name>`` naming, each column's kind) and the one
  reference lift; plain Python, imported here at once;
- :mod:`raymimic.score_table.table`: the schema, file names, writer and readers (pyarrow,
  fsspec); its names are imported from here on first use, so reading the vocabulary does not
  import them.
"""
from __future__ import annotations

import importlib

from raymimic.score_table.columns import (
    ALIGNED,
    BASELINE,
    BASELINES,
    BUILTIN_CONTROLS,
    CONTROL,
    CONTROL_NAME,
    CONTROL_PREFIX,
    CONTROLS,
    KINDS,
    LIFT_DEFINITION,
    OTHER_REFERENCE,
    PRIMARY,
    REFERENCE,
    REFERENCE_BASELINES,
    REFERENCE_VARIANT,
    REFERENCE_VARIANTS,
    TARGET_BASELINES,
    WITHOUT_REFERENCE,
    column_kind,
    control_column,
    control_name,
    reference_lift,
    uses_reference,
)

__all__ = [
    # raymimic.score_table.columns
    "ALIGNED", "BASELINE", "BASELINES", "BUILTIN_CONTROLS", "CONTROL", "CONTROL_NAME", "CONTROL_PREFIX", "CONTROLS", "KINDS",
    "LIFT_DEFINITION", "OTHER_REFERENCE", "PRIMARY", "REFERENCE", "REFERENCE_BASELINES", "REFERENCE_VARIANT",
    "REFERENCE_VARIANTS", "TARGET_BASELINES", "WITHOUT_REFERENCE", "column_kind", "control_column", "control_name",
    "reference_lift", "uses_reference",
    # raymimic.score_table.table (on first use)
    "COLUMNS", "CONTRACT", "CONTROL_TYPE", "REQUIRED_FIELDS", "SCHEMA", "STAGE2_COLUMNS", "ScoreFile", "ScoreTableError",
    "ScoreTableWriter", "check_schema", "conform", "control_names", "count_rows", "discard_from_step", "discard_parts",
    "file_name", "ordered_schema", "parse_file_name", "part_name", "read_footers", "read_score_dataset", "read_score_table",
    "schema_for", "score_files",
    "table_files", "write_part",
]


def __getattr__(name: str):
    """Names of :mod:`raymimic.score_table.table`, imported on first use."""
    table = importlib.import_module("raymimic.score_table.table")
    try:
        return getattr(table, name)
    except AttributeError:
        raise AttributeError(f"module 'raymimic.score_table' has no attribute {name!r}") from None
