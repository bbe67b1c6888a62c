"""Score columns, uniform weights, the paper's rule and the reference lift (Stage 2), on the local pandas path."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import lift_table

from raymimic.score_table import column_kind
from raymimic.select.mimic_filter import MimicFilter
from raymimic.select.quality import drop_auc, lift_metrics, spearman, top_k
from raymimic.select.report import NO_CONTROLS, lift_lines

DECISION_COLUMNS = ["uid", "n_obs", "votes_gmm", "votes_kmeans", "votes_threshold", "keep_gmm", "keep_kmeans", "keep_threshold",
                    "mimic_keep", "mimic_score", "mean_raw_score", "mean_norm_weight"]


@pytest.fixture(scope="module")
def random_zero():
    return lift_table()


def test_lift_is_positive_when_only_the_reference_separates(random_zero):
    table, truth = random_zero
    stage = MimicFilter(table, method="ensemble").fit()
    assert stage.lift_value_columns == ["step_z_score", "step_z_score_fixed", "step_z_score_zero"]
    lift = stage.reference_lift(truth)
    rows = lift["columns"]
    assert rows["score"]["auc"] == 1.0 and rows["score"]["f1"] == 1.0
    assert 0.4 < rows["score_zero"]["auc"] < 0.6 and rows["score_zero"]["auc_either_sign"] >= 0.5
    assert lift["controls"] == ["score_zero"] and lift["best_control"] == "score_zero"  # fixed is a reference variant, not a control
    assert rows["score_fixed"]["kind"] == "reference variant" and rows["score_zero"]["kind"] == "control"
    assert lift["reference_lift"] == pytest.approx(0.5, abs=0.08)
    assert lift["reference_lift"] == pytest.approx(1.0 - rows["score_zero"]["auc_either_sign"])
    assert lift["reference_lift_f1"] > 0.4 and lift["filter_detection"]["f1"] == 1.0
    assert abs(rows["score"]["spearman_zero"]) < 0.2 and rows["score"]["spearman_filter"] == pytest.approx(1.0)
    k = lift["n_kept"]
    assert rows["score"]["overlap_filter"] == 1.0 and rows["score_zero"]["overlap_filter"] == pytest.approx(k / 400, abs=0.1)
    assert lift["n_uids"] == lift["n_matched_uids"] == 400 and lift["sampled"] is False
    assert "adds nothing" not in lift["verdict"] and lift["verdict"].startswith(f"reference lift +{lift['reference_lift']:.3f}")
    text = "\n".join(lift_lines(json.loads(json.dumps(lift))))
    assert "| **`score`** (filter) | reference | 400 |" in text and "| `score_zero` | control | 400 |" in text
    assert f"**Reference lift: {lift['reference_lift']:+.3f}**" in text and "AUC either sign" in text
    assert "adds nothing" not in text and "share of the filter's kept uids" in text


def test_lift_is_zero_when_a_control_is_as_good_either_sign():
    table, truth = lift_table(zero="flipped")
    lift = MimicFilter(table, method="gmm").fit().reference_lift(truth)
    zero = lift["columns"]["score_zero"]
    assert zero["auc"] == 0.0 and zero["auc_either_sign"] == 1.0  # the opposite sign, as good a detector
    assert zero["spearman_zero"] == pytest.approx(1.0) and lift["columns"]["score"]["spearman_zero"] == pytest.approx(-1.0)
    assert lift["reference_lift"] == pytest.approx(0.0, abs=1e-12) and lift["reference_lift"] <= 0
    assert "the reference adds nothing measurable here" in lift["verdict"]
    assert "the reference adds nothing measurable here" in "\n".join(lift_lines(lift))


def test_lift_without_ground_truth_reports_rank_agreement(random_zero):
    table, _ = random_zero
    lift = MimicFilter(table, method="gmm").fit().reference_lift()
    assert lift["ground_truth"] is False and lift["reference_lift"] is None
    assert "auc" not in lift["columns"]["score"] and lift["columns"]["score_fixed"]["spearman_filter"] > 0.5
    assert lift["verdict"].startswith("no ground truth") and "Spearman" in lift["verdict"]
    text = "\n".join(lift_lines(lift))
    assert "Spearman vs score_zero" in text and "AUC either sign |" not in text and "Reference lift:" not in text


def test_score_column_zero_filters_on_the_control():
    table, truth = lift_table(zero="flipped")
    stage = MimicFilter(table, method="threshold", score_column="zero").fit()
    assert stage.score_column == "score_zero" and stage.stats["features"] == {"threshold": "step_z"}  # never a weight feature
    # by hand: zero's step_z > 0 per row, a majority of the 2 epochs' votes (a tie drops)
    z = table.groupby("step")["score_zero"].transform(lambda x: (x - x.mean()) / x.std(ddof=0))
    votes = (z > 0).groupby(table["uid"]).sum()
    expected = (2 * votes > table.groupby("uid").size()).sort_index()
    np.testing.assert_array_equal(stage.decisions.set_index("uid")["mimic_keep"].sort_index(), expected)
    noisy = truth.set_index("uid")["is_noisy"].sort_index()
    np.testing.assert_array_equal(expected.to_numpy(), noisy.to_numpy())  # the flipped control keeps the noisy samples
    np.testing.assert_allclose(stage.decisions["mean_raw_score"], stage.decisions["uid"].map(table.groupby("uid")["score_zero"].mean()))
    lift = stage.reference_lift(truth)
    assert lift["filter_column"] == "score_zero" and lift["columns"]["score_zero"]["spearman_filter"] == pytest.approx(1.0)
    assert lift["columns"]["score"]["overlap_filter"] == 0.0 and lift["reference_lift"] == pytest.approx(0.0, abs=1e-12)
    for column in ("score_zero", "score"):  # the full column name works too
        assert MimicFilter(table, method="gmm", score_column=column).fit().stats["features"] == {"gmm": "step_z"}


def test_score_column_errors(random_zero):
    table, _ = random_zero
    with pytest.raises(ValueError, match=r"score column 'score_init' is not in the score table; its score columns are "
                                         r"\['score', 'score_fixed', 'score_zero'\]"):
        MimicFilter(table, score_column="init").fit()
    with pytest.raises(ValueError, match="belongs to the primary score only"):
        MimicFilter(table, method="threshold", feature="norm_weight", score_column="zero")
    with pytest.raises(ValueError, match="belongs to the primary score only"):
        MimicFilter(table, method="gmm", paper_rule=True, score_column="fixed")
    with pytest.raises(ValueError, match="score column 'Zero' is not valid"):
        MimicFilter(table, score_column="Zero")


def test_uniform_weights_fall_back_to_step_z_and_refuse_weight_features():
    table, truth = lift_table(uniform=True)
    stage = MimicFilter(table, method="ensemble").fit()
    assert stage.stats["weights"]["informative"] is False and stage.weights_informative is False
    assert stage.stats["features"] == {"gmm": "step_z", "kmeans": "step_z", "threshold": "step_z"}
    assert stage.binarizers["threshold"].boundary == 0.0
    keep_threshold = stage.decisions["keep_threshold"].to_numpy(bool)
    noisy = stage.decisions["uid"].map(truth.set_index("uid")["is_noisy"]).to_numpy(bool)
    assert keep_threshold.any() and np.array_equal(keep_threshold, ~noisy)  # no longer drops every sample
    assert json.loads(json.dumps(stage.params()))["features"]["threshold"] == "step_z"
    for feature in ("norm_weight", "log_norm_weight"):
        with pytest.raises(ValueError, match="recorded under uniform weights"):
            MimicFilter(table, method="threshold", feature=feature).fit()
    with pytest.raises(ValueError, match=r"paper rule.*recorded under uniform weights"):
        MimicFilter(table, method="ensemble", paper_rule=True).fit()


def test_paper_rule_binarizes_the_weight(random_zero):
    table, truth = random_zero
    stage = MimicFilter(table, method="ensemble", paper_rule=True).fit()
    assert stage.stats["features"] == {"gmm": "norm_weight", "kmeans": "norm_weight", "threshold": "norm_weight"}
    assert stage.params()["paper_rule"] is True and stage.binarizers["threshold"].boundary == 1.0
    above = table["weight"].to_numpy(np.float64) > 1.0 / table["batch_size"].to_numpy()  # the paper's w_i > 1/B
    votes = pd.Series(above.astype(int), index=table["uid"]).groupby(level=0).sum()
    got = stage.decisions.set_index("uid")["votes_threshold"]
    np.testing.assert_array_equal(got.sort_index().to_numpy(), votes.sort_index().to_numpy())
    default = MimicFilter(table, method="ensemble").fit()
    assert default.stats["features"]["threshold"] == "norm_weight"  # informative weights: today's defaults unchanged
    with pytest.raises(ValueError, match="top-fraction ranks the score"):
        MimicFilter(table, method="top-fraction", paper_rule=True)
    with pytest.raises(ValueError, match="drop --feature step_z"):
        MimicFilter(table, method="gmm", paper_rule=True, feature="step_z")


def test_old_tables_without_control_columns_decide_as_before(random_zero):
    table, truth = random_zero
    old = table.drop(columns=["score_zero", "score_fixed"])
    plain = MimicFilter(old, method="ensemble").fit()
    with_controls = MimicFilter(table, method="ensemble").fit()
    pd.testing.assert_frame_equal(plain.decisions[DECISION_COLUMNS], with_controls.decisions[DECISION_COLUMNS])
    assert plain.lift_value_columns == [] and plain.reference_lift(truth) is None
    assert not any(c.startswith("step_z_") for c in plain.decisions.columns)
    assert lift_lines(None)[-1] == NO_CONTROLS and "No control columns recorded" in NO_CONTROLS
    # asked for (as `raymimic filter --ground-truth` does): the reference's own AUC, and no lift without controls
    lift = MimicFilter(old, method="ensemble", lift=True).fit().reference_lift(truth)
    assert list(lift["columns"]) == ["score"] and lift["columns"]["score"]["auc"] == 1.0 and lift["reference_lift"] is None
    assert lift["verdict"].startswith("no control direction")
    assert "| **`score`** (filter) |" in "\n".join(lift_lines(lift))


def test_lift_tolerates_missing_control_values_and_samples_uids(random_zero):
    table, truth = random_zero
    partial = table.copy()
    partial.loc[partial["epoch"] == 0, "score_fixed"] = np.nan  # e.g. files written before the control was recorded
    stage = MimicFilter(partial, method="gmm").fit()
    assert stage.lift_stats["score_fixed"].count.sum() == len(table) // 2
    lift = stage.reference_lift(truth)
    assert lift["columns"]["score_fixed"]["uids"] == 400 and lift["columns"]["score_fixed"]["auc"] > 0.9
    sample = stage.lift_sample(max_uids=100)
    assert 50 < len(sample) < 160 and sample.equals(stage.lift_sample(max_uids=100))  # seeded: the same sample again
    small = stage.reference_lift(truth, max_uids=100)
    assert small["sampled"] is True and small["n_uids"] == len(sample) and small["n_uids_total"] == 400
    assert "a seeded sample of" in "\n".join(lift_lines(small))


def test_lift_metric_functions_on_hand_examples():
    values = np.array([3.0, 1.0, np.nan, 2.0, 0.0])
    np.testing.assert_array_equal(top_k(values, 2), [True, False, False, True, False])
    noisy = np.array([False, True, True, False, True])
    assert drop_auc(values, noisy) == 1.0 and drop_auc(-values, noisy) == 0.0
    assert drop_auc(values, np.array([False, False, True, False, False])) is None  # no noisy uid among the finite values
    assert spearman(values, 2 * values) == pytest.approx(1.0) and spearman(values, np.ones(5)) is None
    keep = np.array([True, False, False, True, False])
    lift = lift_metrics({"score": values, "score_zero": -values, "score_rho": values}, keep, "score", noisy)
    assert lift["columns"]["score_zero"]["auc"] == 0.0 and lift["reference_lift"] == 0.0
    assert lift["columns"]["score_rho"]["kind"] == "baseline" and lift["controls"] == ["score_zero"]
    assert [column_kind(c) for c in ("score", "score_init", "score_random", "score_current", "score_laion")] == [
        "reference", "control", "control", "reference variant", "other reference"]
    with pytest.raises(ValueError, match="not among the columns"):
        lift_metrics({"score": values}, keep, "score_zero")


def test_quickstart_report_shows_the_lift_table_when_controls_were_recorded(tmp_path, random_zero):
    from raymimic_experiments.quickstart import detection_metrics, write_report

    table, truth = random_zero
    model = {"zeroshot_top1": 0.5, "zeroshot_top5": 0.9, "image_to_text_recall@1": 0.1, "image_to_text_recall@5": 0.3,
             "text_to_image_recall@1": 0.1, "text_to_image_recall@5": 0.2}
    results = {"config": {"samples": 400, "noise": 0.4, "model": "raymimic-tiny", "method": "ensemble"},
               "filter": {"kept": 240, "quality": {"fraction_kept": 0.6}},
               "detection": detection_metrics(np.array([True, False]), np.array([True, False])),
               "detection_clipscore": detection_metrics(np.array([False, True]), np.array([True, False])),
               "models": {"whole pool": {**model, "samples": 400}}, "seconds": 1.0}
    text = open(write_report(str(tmp_path), dict(results))).read()
    assert "## Reference lift" in text and NO_CONTROLS in text and "| score column |" not in text
    (tmp_path / "filter").mkdir()
    (tmp_path / "pool").mkdir()
    MimicFilter(table, method="ensemble").fit().decisions.to_parquet(tmp_path / "filter" / "decisions.parquet")
    truth.to_parquet(tmp_path / "pool" / "ground_truth.parquet")
    text = open(write_report(str(tmp_path), dict(results))).read()
    assert "| `score_zero` | control | 400 |" in text and "**Reference lift: +0.4" in text and NO_CONTROLS not in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["lift"]["reference_lift"] == pytest.approx(0.5, abs=0.08)
