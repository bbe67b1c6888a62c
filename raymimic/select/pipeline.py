"""The Stage 2 pipeline behind ``raymimic filter``: mimic filter, optional pool stages, outputs."""
from __future__ import annotations

import time

import fsspec

from raymimic.select.config import FilterConfig
from raymimic.select.executors.parts import DecisionParts
from raymimic.select.executors.tasks import write_part_outputs
from raymimic.select.mimic_filter import MimicFilter, check_truth
from raymimic.select.output import TEMPORARY_PREFIX, write_outputs, write_summary
from raymimic.select.stages import keep_where

__all__ = ["FilterConfig", "run_filter", "check_inputs", "prepare_output", "read_ground_truth"]

_POOL_COLUMNS = ["uid", "text", "original_width", "original_height", "clip_b32_similarity_score", "clip_l14_similarity_score"]


def run_filter(cfg: FilterConfig) -> dict:
    """Run Stage 2 end to end and return the summary written to ``cfg.output/summary.json``."""
    started = time.time()
    scores, output, pool, method = cfg.scores, cfg.output, cfg.pool, cfg.method
    truth = read_ground_truth(cfg.ground_truth) if cfg.ground_truth else None  # read first: a bad file fails before any work
    work = prepare_output(output, cfg.overwrite)
    mimic = MimicFilter(scores, method=method, fraction=cfg.fraction, feature=cfg.feature, rule=cfg.rule, fit_sample=cfg.fit_sample,
                        seed=cfg.seed, nan=cfg.nan, duplicates=cfg.duplicates, missing=cfg.missing, drop=False,
                        score_column=cfg.score_column, paper_rule=cfg.paper_rule, lift=True if truth is not None else None,
                        spill_dir=work, task_resources=cfg.task_resources).fit()
    lift = mimic.reference_lift(truth)
    if lift is not None and cfg.ground_truth:
        lift["ground_truth_path"] = cfg.ground_truth
    stages = [mimic]
    if pool is None:
        # the streaming path's parts are read on the driver, as write_outputs streams them there anyway
        source = mimic.decisions if mimic.decision_parts is None else mimic.decision_parts
        decisions = source.rename_columns({"mimic_keep": "keep"})
        extra = {}
    else:
        decisions, stages, extra = _with_pool(mimic, pool, cfg.clip_top, cfg.min_clip_score, cfg.clip_column, cfg.basic, cfg.language_model)
    per_method = [f"keep_{m}" for m in mimic.methods]
    columns = ["uid", "mimic_score", "mean_norm_weight", "mean_raw_score", "n_obs", *per_method, "mimic_keep", "mimic_scored",
               "clip_score", "clip_keep", "basic_keep", "keep", *mimic.lift_value_columns]
    summary = {
        "method": method, "score_column": mimic.score_column, "stages": [s.params() for s in stages], "mimic": mimic.stats,
        "scores": scores, "pool": pool, **extra, "lift": lift,
    }
    writer = write_part_outputs if isinstance(decisions, DecisionParts) else write_outputs  # parts: keep.npy streamed per part
    summary = writer(decisions, output, keep_column="keep", quality_column="mean_raw_score", columns=columns, summary=summary, write=False)
    summary["files"]["fit_sample.parquet"] = _write_fit_sample(mimic, output)
    if cfg.gallery:
        from raymimic.select.gallery import write_filter_gallery

        gallery = write_filter_gallery(output, pool, cfg.ground_truth)
        summary["files"]["gallery.html"] = gallery.pop("path")
        summary["gallery"] = {**gallery, "problems": len(gallery["problems"])}
    if cfg.report:
        from raymimic.select.report import write_report

        summary["files"]["report.md"] = write_report(output, summary=summary)
    summary["seconds"] = round(time.time() - started, 2)
    fs, root = fsspec.core.url_to_fs(output)
    write_summary(fs, root, summary)  # last: its presence marks the output complete
    mimic.close()  # the decision parts were read into the outputs
    return summary


WORK_FOLDER = "_stage2_tmp"
"""The folder in ``--output`` where an unfinished run keeps its committed work (removed once the outputs are written)."""


def check_inputs(cfg: FilterConfig) -> int:
    """Fail fast, before any work: ``--output`` can be written, the score files are parquet with the contract's columns and
    agreeing types; their row count. ``ValueError`` or ``FileNotFoundError`` naming the file or option."""
    from raymimic.score_table import STAGE2_COLUMNS
    from raymimic.select.executors.tasks import ScoreFiles

    _check_writable(cfg.output)
    files = ScoreFiles(cfg.scores, STAGE2_COLUMNS)
    if files.n_rows == 0:
        raise ValueError(f"the score table {cfg.scores!r} is empty ({len(files.paths)} files, 0 rows): nothing to filter")
    return files.n_rows


def _check_writable(output: str) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    try:
        fs.makedirs(root, exist_ok=True)
        probe = f"{root}/{TEMPORARY_PREFIX}probe"
        with fs.open(probe, "wb") as f:
            f.write(b"")
        fs.rm(probe)
    except OSError as err:
        raise ValueError(f"--output {output!r} cannot be written ({err.strerror or err}); give a folder this user can create and "
                         "write") from None


def prepare_output(output: str, overwrite: bool) -> str:
    """The work folder of a run into ``output``; a previous run's ``summary.json`` is removed first, so the folder never
    looks complete while its files are being replaced. ``overwrite`` also drops a previous run's unfinished work."""
    _check_writable(output)
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if fs.exists(f"{root}/summary.json"):
        fs.rm(f"{root}/summary.json")
    if overwrite and fs.exists(f"{root}/{WORK_FOLDER}"):
        fs.rm(f"{root}/{WORK_FOLDER}", recursive=True)
    return f"{output.rstrip('/')}/{WORK_FOLDER}"


def read_ground_truth(path: str):
    """The ground-truth parquet (``uid``, boolean ``is_noisy``; e.g. a toy pool's ``ground_truth.parquet``) as a checked frame."""
    import fsspec
    import pandas as pd

    try:
        with fsspec.open(path, "rb") as f:
            frame = pd.read_parquet(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"ground truth {path!r} does not exist (a parquet file with uid and a boolean is_noisy)") from err
    return check_truth(frame, f"ground truth {path}")


def _with_pool(mimic: MimicFilter, pool: str, clip_top, min_clip_score, clip_column, basic, language_model):
    from raymimic.data.metadata import read_metadata
    from raymimic.select.filters import BasicFilter, CLIPScoreFilter

    metadata = read_metadata(pool, columns=[c for c in _POOL_COLUMNS if c != "uid"])
    stages, ds = [mimic], mimic.annotate(metadata)
    keep_columns = ["mimic_keep"]
    if clip_top is not None or min_clip_score is not None:
        clip = CLIPScoreFilter(top_fraction=clip_top, min_score=min_clip_score, column=clip_column, drop=False)
        # fit on the pool before any other filter: "top 30%" is of the whole pool
        ds = clip.fit_apply(ds)
        stages.append(clip)
        keep_columns.append(clip.keep_column)
    if basic:
        stage = BasicFilter(language_model=language_model, drop=False)
        ds = stage.fit_apply(ds)
        stages.append(stage)
        keep_columns.append(stage.keep_column)
    ds = keep_where(ds, keep_columns, output="keep").materialize()
    n_pool = ds.count()
    n_scored_in_pool = int(ds.sum("mimic_scored") or 0) if n_pool else 0
    extra = {"pool_counts": {
        "n_pool_uids": n_pool,
        "n_pool_uids_without_score": n_pool - n_scored_in_pool,
        # score uids the pool does not list cannot be kept (no metadata, no shard): counted here
        "n_score_uids_absent_from_pool": int(mimic.stats["n_uids"] - n_scored_in_pool),
        "unscored_handling": mimic.missing,
    }}
    return ds, stages, extra


def _write_fit_sample(mimic: MimicFilter, output: str) -> str:
    """The fit sample with each binarizer's feature, for the report's histograms."""
    import fsspec
    import pandas as pd

    from raymimic.select.binarize import compute_feature

    sample = mimic.sample
    frame = pd.DataFrame({"epoch": sample["epoch"].to_numpy(), "step": sample["step"].to_numpy()})
    features = {b.feature for b in mimic.binarizers.values()} | {mimic.score_feature}
    for feature in sorted(features):
        frame[feature] = compute_feature(sample, feature, mimic.step_stats)
    path = f"{output.rstrip('/')}/fit_sample.parquet"
    with fsspec.open(path, "wb") as f:
        frame.to_parquet(f, index=False)
    return path


