"""Stage 2 report: per-epoch score histograms with the fitted mixture, counts, quality.

Reads only the filter's output directory (``summary.json`` and ``fit_sample.parquet``, the
random sample the binarizers were fitted on), so it runs without Ray, anywhere the output
can be read. Writes ``report.md`` and one PNG per binarizer feature.
"""
from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pandas as pd


def _read_json(path: str) -> dict:
    with fsspec.open(path, "r") as f:
        return json.load(f)


def _binarizers(summary: dict) -> dict:
    for stage in summary.get("stages", []):
        if stage.get("stage") == "MimicFilter":
            return stage.get("binarizers", {})
    return {}


def _histogram_png(sample: pd.DataFrame, feature: str, fits: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = sorted(sample["epoch"].unique())
    fig, axes = plt.subplots(len(epochs), 1, figsize=(7, 2.6 * len(epochs)), squeeze=False)
    values = sample[feature].to_numpy(np.float64)
    lo, hi = np.nanpercentile(values, [0.5, 99.5])
    grid = np.linspace(lo, hi, 400)
    for ax, epoch in zip(axes[:, 0], epochs):
        x = sample.loc[sample["epoch"] == epoch, feature].to_numpy(np.float64)
        ax.hist(x, bins=80, range=(lo, hi), density=True, color="0.75", label=f"epoch {epoch} ({len(x)} sampled rows)")
        for name, params in fits.items():
            if params.get("means"):
                total = np.zeros_like(grid)
                for m, v, w in zip(params["means"], params["variances"], params["weights"]):
                    pdf = w * np.exp(-(grid - m) ** 2 / (2 * v)) / np.sqrt(2 * np.pi * v)
                    ax.plot(grid, pdf, lw=1, ls="--")
                    total += pdf
                ax.plot(grid, total, lw=1.5, label=f"{name} mixture")
            if params.get("boundary") is not None and lo <= params["boundary"] <= hi:
                ax.axvline(params["boundary"], color="k", lw=1, ls=":", label=f"{name} boundary {params['boundary']:.3g}")
        ax.set_xlabel(feature)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def write_report(output: str, summary: dict | None = None) -> str:
    """Write ``output/report.md`` (+ PNGs) from a filter's output directory; return its path."""
    root = output.rstrip("/")
    summary = summary or _read_json(f"{root}/summary.json")
    with fsspec.open(f"{root}/fit_sample.parquet", "rb") as f:
        sample = pd.read_parquet(f)
    if len(sample) == 0:
        raise ValueError(f"{root}/fit_sample.parquet is empty: nothing to draw")
    fits = _binarizers(summary)
    by_feature: dict[str, dict] = {}
    for name, params in fits.items():
        by_feature.setdefault(params["feature"], {})[name] = params
    if not by_feature:  # top-fraction: draw the ranked score
        feature = next(c for c in sample.columns if c not in ("epoch", "step"))
        by_feature[feature] = {}
    n, kept = summary.get("n_decisions"), summary.get("n_kept")
    lines = ["# Stage 2 filter report", "", f"- method: `{summary.get('method')}`", f"- samples (uids) decided: {n}",
             f"- kept: {kept} ({100 * summary.get('fraction_kept', 0):.2f}%), dropped: {None if n is None else n - kept}"]
    mimic = next((s for s in summary.get("stages", []) if s.get("stage") == "MimicFilter"), {})
    stats = summary.get("mimic", {})
    lines.append(f"- score rows: {stats.get('n_rows')}, NaN rows dropped: {stats.get('n_nan_rows')}, duplicate (uid, step) rows: {stats.get('n_duplicate_rows')}")
    if mimic:
        lines.append(f"- vote rule: `{mimic.get('rule')}`, fit sample: {mimic.get('fit_sample')} rows requested")
    if summary.get("pool_counts"):
        lines.append(f"- pool: {json.dumps(summary['pool_counts'])}")
    quality = summary.get("quality") or {}
    if quality:
        lines += ["", "## Quality estimate", "", "| fraction kept | mean score | mean score kept | mean score dropped |", "|---|---|---|---|",
                  f"| {quality['fraction_kept']:.4f} | {quality['mean_score']:.4g} | {quality['mean_score_kept']} | {quality['mean_score_dropped']} |",
                  "", f"(score column: `{quality.get('score_column')}`)"]
    lines += ["", "## Fitted binarizers", ""]
    for name, params in fits.items():
        shown = {k: v for k, v in params.items() if k not in ("step_stats",)}
        lines.append(f"- **{name}**: `{json.dumps(shown)}`")
    for feature, group in by_feature.items():
        png = f"hist_{feature}.png"
        with fsspec.open(f"{root}/{png}", "wb") as f:
            f.write(_histogram_png(sample, feature, group))
        lines += ["", f"## Histograms of `{feature}` per epoch (fit sample)", "", f"![{feature}]({png})"]
    path = f"{root}/report.md"
    with fsspec.open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
