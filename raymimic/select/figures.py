"""Pictures for the lift section of the Stage-2 report, drawn from a filter's output folder.

With a ground truth (``summary["lift"]["ground_truth_path"]``): the ROC curve of every recorded
score column (dropping a low score as flagging the sample as noisy). Without one: the Spearman
rank-correlation heatmap of the columns. Both read the per-uid ``step_z_<column>`` values of
``decisions.parquet`` (a seeded sample of at most :data:`FIGURE_MAX_UIDS` uids, streamed by row
group) and are written as PNGs beside ``report.md``; :func:`lift_figure_lines` returns the
Markdown that shows them, and links the gallery when the filter wrote one.
"""
from __future__ import annotations

import io

import fsspec
import numpy as np
import pandas as pd

FIGURE_MAX_UIDS = 200_000
ROC_PNG, HEATMAP_PNG = "lift_roc.png", "lift_rank_correlation.png"


def sampled_lift_values(decisions_path: str, columns: list[str], max_uids: int = FIGURE_MAX_UIDS, seed: int = 0) -> pd.DataFrame:
    """``uid`` and those of the ``step_z_<column>`` value ``columns`` the file has, for a seeded sample (by uid key) of at
    most ~``max_uids`` decisions."""
    from raymimic.select.gallery import uid_keys
    from raymimic.select.output import read_decisions

    decisions = read_decisions(decisions_path)
    columns = [c for c in columns if c in decisions.schema.names]  # outputs of older runs may lack some
    fraction = min(1.0, max_uids / max(decisions.count_rows(), 1))
    parts = []
    for batch in decisions.to_batches(columns=["uid", *columns], batch_size=65_536):
        frame = batch.to_pandas()
        parts.append(frame[uid_keys(frame["uid"].to_numpy(), seed) < fraction] if fraction < 1 else frame)
    return pd.concat(parts, ignore_index=True)


def roc_png(values: pd.DataFrame, is_noisy: np.ndarray, columns: dict[str, str]) -> bytes:
    """ROC curves of dropping the lowest values of each column (``label -> value column``) as flagging the noisy samples."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for label, column in columns.items():
        x = values[column].to_numpy(np.float64)
        finite = np.isfinite(x)
        if finite.sum() < 2 or len(set(is_noisy[finite])) < 2:
            continue
        fpr, tpr, _ = roc_curve(is_noisy[finite], -x[finite])
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {roc_auc_score(is_noisy[finite], -x[finite]):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="chance")
    ax.set_xlabel("clean samples dropped (false-positive rate)")
    ax.set_ylabel("noisy samples dropped (true-positive rate)")
    ax.set_title("Dropping the lowest-scored, per score column")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig, plt)


def rank_correlation_png(values: pd.DataFrame, columns: dict[str, str]) -> bytes:
    """Heatmap of the Spearman rank correlations between the columns (``label -> value column``)."""
    plt = _pyplot()
    labels = list(columns)
    matrix = values[list(columns.values())].corr(method="spearman").to_numpy()
    size = 2.4 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.6, size))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if np.isfinite(matrix[i, j]):
                colour = "white" if abs(matrix[i, j]) > 0.6 else "black"
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.colorbar(image, ax=ax, label="Spearman rank correlation")
    ax.set_title("Rank agreement of the score columns", fontsize=10)
    return _png(fig, plt)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, plt) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def _truth(path: str | None) -> pd.DataFrame | None:
    if not path:
        return None
    with fsspec.open(path, "rb") as f:
        return pd.read_parquet(f, columns=["uid", "is_noisy"])


def lift_figure_lines(root: str, summary: dict) -> list[str]:
    """Markdown (and PNGs written in ``root``) for the lift section: the gallery link, the ROC curves or the heatmap."""
    from raymimic.select.kernels import lift_value_column

    root = root.rstrip("/")
    lines = []
    if (summary.get("files") or {}).get("gallery.html"):
        lines += ["", "Pictures of dropped, borderline and kept samples, and the same samples under every score column: "
                      "[gallery.html](gallery.html)"]
    lift = summary.get("lift") or {}
    columns = {c: lift_value_column(c) for c in lift.get("columns", {})}
    if len(columns) < 2:
        return lines
    fs, folder = fsspec.core.url_to_fs(root)
    if not fs.exists(f"{folder}/decisions.parquet"):  # a summary alone (the report needs no more): no pictures
        return lines
    values = sampled_lift_values(f"{root}/decisions.parquet", list(columns.values()))
    columns = {label: column for label, column in columns.items() if column in values.columns}
    if len(columns) < 2:
        return lines
    truth = _truth(lift.get("ground_truth_path")) if lift.get("ground_truth") else None
    if truth is not None:
        matched = values.merge(truth.drop_duplicates("uid"), on="uid", how="inner")
        name, png = ROC_PNG, roc_png(matched, matched["is_noisy"].to_numpy(bool), columns)
        caption = f"ROC curves of every score column against the ground truth ({len(matched)} uids)"
    else:
        name, png = HEATMAP_PNG, rank_correlation_png(values, columns)
        caption = f"Spearman rank correlation of the score columns ({len(values)} uids; no ground truth)"
    with fsspec.open(f"{root}/{name}", "wb") as f:
        f.write(png)
    return lines + ["", f"{caption}:", "", f"![{caption}]({name})"]
