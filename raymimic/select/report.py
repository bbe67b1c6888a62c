"""Stage 2 report: per-epoch score histograms with the fitted mixture, counts, quality, reference lift.

Reads only the filter's output directory (``summary.json`` and ``fit_sample.parquet``, the
random sample the binarizers were fitted on), so it runs without Ray, anywhere the output
can be read. Writes ``report.md`` and one PNG per binarizer feature. :func:`lift_lines`
renders the reference-lift table (``summary["lift"]``) for this report and the quickstart's.
"""
from __future__ import annotations

import io
import json

import fsspec
import numpy as np
import pandas as pd

from raymimic.select.figures import lift_figure_lines


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


NO_CONTROLS = "No control columns recorded (`score_<name>` in the score table): no reference lift to show."


def _number(value, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def lift_lines(lift: dict | None, heading: str = "##") -> list[str]:
    """Markdown lines of the reference-lift section for ``summary["lift"]`` (None: one sentence, no table)."""
    from raymimic.score_table.columns import BASELINES, CONTROLS, REFERENCE_VARIANTS, TARGET_BASELINES
    from raymimic.select.quality import LIFT_DEFINITIONS

    lines = [f"{heading} Reference lift", ""]
    if not lift or len(lift.get("columns", {})) < 2 and not lift.get("ground_truth"):
        return lines + [NO_CONTROLS]
    truth = lift.get("ground_truth")
    head = ["score column", "kind", "uids", "Spearman vs score_zero", f"Spearman vs {lift['filter_column']}",
            "overlap with filter's kept", "overlap with score_zero's top k"]
    if truth:
        head += ["AUC (noisy -> drop)", "AUC either sign", "lift", "F1 at the same kept fraction"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for column, row in lift["columns"].items():
        name = f"**`{column}`** (filter)" if column == lift["filter_column"] else f"`{column}`"
        cells = [name, row["kind"], str(row["uids"]), _number(row["spearman_zero"]), _number(row["spearman_filter"]),
                 _number(row["overlap_filter"]), _number(row["overlap_zero"])]
        if truth:
            cells += [_number(row.get("auc")), _number(row.get("auc_either_sign")), _number(row.get("lift"), "+.3f"),
                      _number(row.get("f1"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if truth and lift.get("reference_lift") is not None:
        lines.append(f"**Reference lift: {lift['reference_lift']:+.3f}** (AUC of `score` {lift['reference_auc']:.3f} minus the best "
                     f"column computed without the reference, `{lift['best_control']}`, {lift['best_control_auc_either_sign']:.3f} "
                     "either sign; "
                     f"by F1 at the same kept fraction: {_number(lift.get('reference_lift_f1'), '+.3f')}).")
        lines.append("")
    if lift.get("verdict"):
        verdict = lift["verdict"]
        lines.append(f"**In words:** {verdict}{'' if verdict.endswith('.') else '.'}")
    sampled = (f"a seeded sample of {lift['n_uids_sampled']} of {lift['n_uids_total']} uids (at most {lift['max_uids']}, seed "
               f"{lift['sample_seed']})" if lift.get("sampled") else f"all {lift.get('n_uids_total', lift['n_uids'])} uids")
    lines += ["", f"Computed on the per-uid decisions of {sampled}, k = {lift['n_kept']} kept of {lift['n_uids']} "
                  f"(fraction {_number(lift.get('fraction_kept'))})"
              + (f"; {lift.get('n_matched_uids')} uids matched the ground truth, {lift.get('n_sampled_uids_without_truth')} "
                 "had none and are left out" if truth and "n_matched_uids" in lift else "") + "."]
    if truth and lift.get("filter_detection"):
        det = lift["filter_detection"]
        lines.append(f"The filter's own decisions against the ground truth: precision {det['precision']:.3f}, recall "
                     f"{det['recall']:.3f}, F1 {det['f1']:.3f} ({det['n_dropped']} dropped, {det['n_noisy']} noisy).")
    if lift.get("skipped"):
        lines.append(f"Left out (no per-step standardisation possible): {json.dumps(lift['skipped'])}.")
    shown = ["uids", "spearman_zero", "spearman_filter", "overlap_filter", "overlap_zero"]
    if truth:
        shown += ["auc", "auc_either_sign", "lift", "f1", "reference_lift", "reference_lift_f1"]
    lines += ["", "Every column is the per-uid mean of that score column's per-step standardised value (step_z); higher = keep. "
                  f"Kinds: controls ({', '.join(CONTROLS)}) carry no knowledge of the reference; reference variants "
                  f"({', '.join(REFERENCE_VARIANTS)}) are derived from it; baselines ({', '.join(BASELINES)}) are other selection "
                  f"scores, of which {', '.join(TARGET_BASELINES)} is the target's own and counts as a control; any other name is "
                  "another reference. Definitions:", ""]
    lines += [f"- `{key}`: {LIFT_DEFINITIONS[key]}" for key in shown]
    return lines


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
    lines.append(f"- score rows: {stats.get('n_rows')}, NaN rows dropped: {stats.get('n_nan_rows')}, "
                 f"duplicate (uid, step) rows: {stats.get('n_duplicate_rows')}")
    if mimic:
        lines.append(f"- vote rule: `{mimic.get('rule')}`, fit sample: {mimic.get('fit_sample')} rows requested")
        weights = stats.get("weights") or {}
        said = {True: "informative", False: "uniform (B*w = 1 on every row: weight features unavailable)"}.get(weights.get("informative"))
        chosen = mimic.get("features") or {m: params.get("feature") for m, params in fits.items()}  # older summaries: from the fits
        features = ", ".join(f"{m}: `{f}`" for m, f in chosen.items()) or "none (top-fraction ranks the score)"
        lines.append(f"- score column: `{mimic.get('score_column', 'score')}`; binarizer features: {features}"
                     + (" (the paper's rule: every binarizer on w_i)" if mimic.get("paper_rule") else "")
                     + (f"; weights: {said}" if said else ""))
    if summary.get("pool_counts"):
        lines.append(f"- pool: {json.dumps(summary['pool_counts'])}")
    quality = summary.get("quality") or {}
    if quality:
        lines += ["", "## Quality estimate", "", "| fraction kept | mean score | mean score kept | mean score dropped |",
                  "|---|---|---|---|",
                  f"| {quality['fraction_kept']:.4f} | {quality['mean_score']:.4g} | {quality['mean_score_kept']} "
                  f"| {quality['mean_score_dropped']} |",
                  "", f"(score column: `{quality.get('score_column')}`)"]
    lines += [""] + lift_lines(summary.get("lift"))
    lines += lift_figure_lines(root, summary)
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
