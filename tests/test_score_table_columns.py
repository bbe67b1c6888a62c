"""The score columns' vocabulary and the one reference lift, and that every report prints the same lift for the same table."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from raymimic.score_table import columns
from raymimic.score_table.columns import column_kind, reference_lift, uses_reference


def test_each_column_has_one_kind_and_only_the_target_s_own_columns_are_controls():
    kinds = {c: column_kind(c) for c in ("score", "score_zero", "score_init", "score_random", "score_fixed", "score_current",
                                         "score_aligned", "score_loss", "score_ref_loss", "score_rho", "score_ref_clipscore",
                                         "score_laion")}
    assert kinds == {"score": "reference", "score_zero": "control", "score_init": "control", "score_random": "control",
                     "score_fixed": "reference variant", "score_current": "reference variant", "score_aligned": "reference variant",
                     "score_loss": "baseline", "score_ref_loss": "baseline", "score_rho": "baseline", "score_ref_clipscore": "baseline",
                     "score_laion": "other reference"}
    without = [c for c in kinds if not uses_reference(c)]
    assert without == ["score_zero", "score_init", "score_random", "score_loss"]
    with pytest.raises(ValueError, match="not a score column"):
        column_kind("weight")


def test_the_vocabulary_is_plain_python():
    code = "import sys, raymimic.score_table.columns; print(sorted(m for m in ('numpy', 'pyarrow', 'fsspec', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_names_are_defined_in_the_vocabulary_alone():
    from raymimic.mimic import controls as mimic_controls
    from raymimic.train import config, step

    assert config.BUILTIN_CONTROLS is columns.BUILTIN_CONTROLS and config.BASELINES is columns.BASELINES
    assert step.BASELINE_NAMES is columns.BASELINES and step.ALIGNED == columns.ALIGNED
    assert mimic_controls.BUILTIN_CONTROLS == tuple(c for c in columns.BUILTIN_CONTROLS if c != columns.ALIGNED)


def test_reference_lift_takes_the_best_control_either_sign_and_skips_undefined_values():
    aucs = {"score": 0.8, "score_zero": 0.3, "score_loss": 0.75, "score_init": None, "score_fixed": 0.9, "score_laion": math.nan}
    lift = reference_lift(aucs)
    assert lift["controls"] == ["score_zero", "score_loss"] and lift["best_control"] == "score_loss"
    assert list(lift["lifts"]) == ["score", "score_fixed", "score_laion"] and lift["lifts"]["score_laion"] is None
    assert lift["lifts"]["score"] == pytest.approx(0.05) and lift["lifts"]["score_fixed"] == pytest.approx(0.15)
    flipped = reference_lift({**aucs, "score_zero": 0.1})  # 1 - 0.1 = 0.9: an upside-down control still counts
    assert flipped["best_control"] == "score_zero" and flipped["lifts"]["score"] == pytest.approx(-0.1)
    f1 = reference_lift({"score": 0.6, "score_zero": 0.1}, either_sign=False)
    assert f1["lifts"]["score"] == pytest.approx(0.5)
    assert reference_lift({"score": 0.6})["lifts"] == {"score": None} and reference_lift({"score": 0.6})["best_control"] is None


def _one_table(n: int = 300, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One step of score rows (so every aggregation ranks the uids alike) where the target's own loss is the best control."""
    rng = np.random.default_rng(seed)
    noisy = rng.random(n) < 0.3
    signal = np.where(noisy, -1.0, 0.0)

    def column(strength):
        return strength * signal + rng.normal(size=n)

    rows = pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "step": 0, "score": column(1.2), "score_zero": column(0.5),
                         "score_init": column(0.2), "score_random": column(0.0), "score_loss": column(2.0),
                         "score_fixed": column(1.0), "score_ref_clipscore": column(1.5)})
    truth = pd.DataFrame({"uid": rows["uid"], "kind": np.where(noisy, "swapped_caption", "clean"), "class_name": "A",
                          "is_noisy": noisy})
    return rows, truth


def test_report_quickstart_grid_and_simulation_print_the_same_lift_for_one_table(tmp_path):
    from raymimic.select.quality import LIFT_VALUE_PREFIX, drop_auc, lift_metrics
    from raymimic.select.report import lift_lines
    from raymimic_experiments import quickstart
    from raymimic_experiments.label_noise.analysis import noise_summary, score_auroc
    from raymimic_experiments.reference_lift.metrics import detection_aucs, lift, per_uid

    rows, truth = _one_table()
    noisy = truth["is_noisy"].to_numpy()
    score_columns = [c for c in rows.columns if c.startswith("score")]
    aucs = {c: drop_auc(rows[c].to_numpy(), noisy) for c in score_columns}
    controls = ["score_zero", "score_init", "score_random", "score_loss"]
    best = max(max(aucs[c], 1 - aucs[c]) for c in controls)
    expected = aucs["score"] - best
    assert best == max(aucs["score_loss"], 1 - aucs["score_loss"]) > aucs["score"]  # the loss is the control that matters here
    assert expected < 0 < aucs["score"] - max(max(aucs[c], 1 - aucs[c]) for c in controls[:3])

    # the filter report (Stage 2's per-uid step_z values)
    values = per_uid(rows, score_columns)
    keep = values["score"].to_numpy() > np.median(values["score"])
    report = lift_metrics({c: values[c].to_numpy() for c in score_columns}, keep, "score", noisy)
    printed = re.search(r"\*\*Reference lift: ([-+]\d\.\d{3})\*\*", "\n".join(lift_lines(report)))
    assert report["reference_lift"] == pytest.approx(expected) and float(printed[1]) == pytest.approx(expected, abs=5e-4)
    assert report["best_control"] == "score_loss"

    # the quickstart, from the filter's decisions and the pool's ground truth
    (tmp_path / "filter").mkdir()
    (tmp_path / "pool").mkdir()
    step_z = {LIFT_VALUE_PREFIX + c: values[c].to_numpy() for c in score_columns}
    decisions = pd.DataFrame({"uid": values.index, "mimic_keep": keep, **step_z})
    decisions.to_parquet(tmp_path / "filter" / "decisions.parquet")
    truth[["uid", "is_noisy"]].to_parquet(tmp_path / "pool" / "ground_truth.parquet")
    from_quickstart = quickstart.reference_lift(str(tmp_path), {})
    assert from_quickstart["reference_lift"] == pytest.approx(expected)
    assert quickstart.filter_column_lift(from_quickstart, "score") == pytest.approx(expected)

    # the reference-lift grid ("all": any noise against clean)
    assert lift(detection_aucs(values, truth), "score")["all"] == pytest.approx(expected)

    # the label-noise simulation: one run per column, each ranked by its per-sample mean
    def run(method, column):
        return {"noise": 0.3, "method": method, "test_accuracy": 0.5, "accuracy_curve": [(0, 0.5)],
                **score_auroc(rows.rename(columns={column: "method_stat"}), noisy)}

    runs = [run("grad-mimic", "score"), *(run(f"grad-mimic[{c.removeprefix('score_')}]", c) for c in controls)]
    simulated = noise_summary(runs, 0.3, [c.removeprefix("score_") for c in controls])["lift"]
    assert simulated["auroc_lift"] == pytest.approx(expected) and simulated["best_control_auroc"] == "loss"
