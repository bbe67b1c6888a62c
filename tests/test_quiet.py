"""A normal run prints no warnings caused by raymimic's own calls.

Each test runs a fast piece of the pipeline under ``warnings.catch_warnings(record=True)``
with ``simplefilter("always")`` and fails on a warning raised from a file inside raymimic/
(warnings are attributed to the calling frame, so deprecations of the APIs we call land
there) or on one of the known messages whose stacklevel points into a library instead.
Warnings that Ray or pandas raise from their own code whatever we pass them (for example
``DataContext()`` touching its own deprecated fields, Ray Data's ``to_pandas`` calling
``reset_index(inplace=True)``) are not ours and are ignored.
"""
from __future__ import annotations

import ast
import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import lift_table

import raymimic

PACKAGE = Path(raymimic.__file__).resolve().parent
# deprecations raised with a stacklevel that names a library frame although our call is the cause
KNOWN = ("torch.distributed.nn.functional", "ExecutionOptions.exclude_resources", "NumPy array is not writable",
         "argument ``concurrency`` is deprecated", "include_groups", "Downcasting object dtype")


def _ours(caught) -> list[str]:
    found = []
    for w in caught:
        text = str(w.message)
        if str(Path(w.filename).resolve()).startswith(str(PACKAGE)) or any(k in text for k in KNOWN):
            found.append(f"{w.filename}:{w.lineno}: {w.category.__name__}: {text[:300]}")
    return found


@contextlib.contextmanager
def quiet():
    """Fail if the block warns from raymimic's own code."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    assert _ours(caught) == []


@contextlib.contextmanager
def no_ray_data_deprecations():
    """Fail if Ray Data *logs* a deprecation of an argument we passed (``concurrency=`` is a logger warning, not a warning)."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING and "deprecated" in record.getMessage():
                records.append(f"{record.name}: {record.getMessage()[:300]}")

    handler = Keep()
    logger = logging.getLogger("ray.data")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
    assert records == []


# -- the contrastive loss's gather -----------------------------------------------------------
def test_single_process_loss_is_quiet():
    from raymimic.clip.loss import contrastive_loss, gather_with_grad

    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    y = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_(True)
    with quiet():
        assert gather_with_grad(x) is x
        contrastive_loss(x, y, torch.tensor(10.0)).backward()


# -- Ray Data stages -------------------------------------------------------------------------
def _image_rows(n=4, size=16):
    rng = np.random.default_rng(0)
    return [{"uid": f"{i:032x}", "image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "text": f"a photo number {i}"}
            for i in range(n)]


def test_preprocess_udf_on_read_only_arrays_is_quiet():
    """The map_batches function itself, in this process: Ray hands it read-only arrays."""
    from raymimic.clip.models import register_model_configs, transforms_for_model
    from raymimic.data.preprocess import BatchTransform, _preprocess_batch

    register_model_configs()
    transform, tokenizer = transforms_for_model("raymimic-tiny")
    rows = _image_rows()
    batch = {"uid": np.array([r["uid"] for r in rows]), "image": np.stack([r["image"] for r in rows]),
             "text": np.array([r["text"] for r in rows], dtype=object)}
    for value in batch.values():
        value.setflags(write=False)
    with quiet():
        (out,) = list(_preprocess_batch(batch, transform=BatchTransform(transform), tokenizer=tokenizer, ledger=None, keep_columns=()))
    assert len(out["uid"]) == 4


def test_ray_data_stages_we_build_are_quiet(ray_session):
    """preprocess_for_clip, evaluate's embedder and the teacher CLIPScore stage: built and (preprocessing) run."""
    import ray

    from raymimic.clip.models import register_model_configs, transforms_for_model
    from raymimic.data.preprocess import preprocess_for_clip
    from raymimic.evaluate import embed
    from raymimic.select.filters import CLIPScoreFilter

    register_model_configs()
    ray.data.range(1)  # Ray Data configures its loggers on first use: add our handler after that
    with quiet(), no_ray_data_deprecations():
        source = ray.data.from_items(_image_rows())
        rows = preprocess_for_clip(source, *transforms_for_model("raymimic-tiny"), batch_size=2, concurrency=1).take_all()
        embed(source, "raymimic-tiny", concurrency=1)  # lazy: the stage's arguments are checked when it is added
        CLIPScoreFilter(min_score=0.0, model="raymimic-tiny").scored(source)
    assert len(rows) == 4 and np.asarray(rows[0]["image"]).dtype == np.float32


def test_trainer_options_are_quiet(ray_session, tmp_path):
    """The TorchTrainer we build: its Ray Data ingest options must not go through deprecated setters."""
    import ray

    from raymimic.train.config import TrainConfig
    from raymimic.train.trainer import build_trainer

    cfg = TrainConfig(pool=str(tmp_path / "pool"), model="raymimic-tiny", output=str(tmp_path / "out"), reference=None,
                      weighting="sgd", workers=1, global_batch=4, samples_seen=8, progress=False)
    with quiet():
        trainer = build_trainer(cfg, ray.data.range(4))
    assert trainer is not None


# -- Stage 2 on the local pandas path, and its report -------------------------------------------
@pytest.mark.parametrize("method", ["ensemble", "top-fraction"])
def test_local_mimic_filter_and_report_are_quiet(tmp_path, method):
    from raymimic.select.mimic_filter import MimicFilter
    from raymimic.select.pipeline import _write_fit_sample
    from raymimic.select.report import write_report

    table, truth = lift_table(n_samples=120, batch=20, tau=1.0)
    out = str(tmp_path)
    with quiet():
        mimic = MimicFilter(table, method=method, fraction=0.6).fit()
        lift = mimic.reference_lift(truth)
        kept = int(mimic.decisions["mimic_keep"].sum())
        summary = {"method": method, "score_column": mimic.score_column, "stages": [mimic.params()], "mimic": mimic.stats,
                   "lift": lift, "n_decisions": len(mimic.decisions), "n_kept": kept, "fraction_kept": kept / len(mimic.decisions)}
        _write_fit_sample(mimic, out)
        report = write_report(out, summary=summary)
    assert os.path.isfile(report) and "# Stage 2 filter report" in Path(report).read_text()


# -- calls that warn only once per process, so are checked in the source ----------------------------
DEPRECATED_IN_SOURCE = {
    r"(?:from|import) torch\.distributed\.nn\b|torch\.distributed\.nn\.functional\.\w+\(":
        "torch.distributed.nn.functional collectives are deprecated: use raymimic.clip.loss.gather_with_grad",
    r"default_ingest_options\(": "DataConfig.default_ingest_options() sets the deprecated ExecutionOptions.exclude_resources",
    r"torch\.(?:as_tensor|from_numpy)\(np\.asarray\(batch\[": "Ray batches are read-only: torch warns (once per process) on a view",
    r"reduce_scatter_tensor\(|all_gather_into_tensor\(": "deprecated in recent torch: reduce_scatter_single / all_gather_single",
}
RAY_DATA_MAPS = {"map", "map_batches", "flat_map", "filter"}


def test_source_has_no_known_deprecated_calls():
    """torch's non-writable NumPy warning fires once per process, so a runtime check can miss it: look at the code."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text, where = path.read_text(), path.relative_to(PACKAGE.parent)
        for number, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, why in DEPRECATED_IN_SOURCE.items():
                if re.search(pattern, code):
                    found.append(f"{where}:{number}: {why}")
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RAY_DATA_MAPS
                    and any(k.arg == "concurrency" for k in node.keywords)):
                found.append(f"{where}:{node.lineno}: Dataset.{node.func.attr}(concurrency=) is deprecated: pass compute=")
    assert found == []
