"""Binarizers, ensemble vote and quality estimate on synthetic score tables."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_scores

from raymimic.select import MimicFilter, StepStats, compute_feature, make_binarizer, quality_estimate, vote, vote_from_counts


def f1_drop(table, keep, noisy_by_uid):
    """F1 of 'dropped' as a detector of noisy (mislabeled) rows."""
    truth = np.array([noisy_by_uid[u] for u in table["uid"]])
    dropped = ~np.asarray(keep)
    tp = (dropped & truth).sum()
    return 2 * tp / (dropped.sum() + truth.sum())


@pytest.fixture(scope="module")
def drifting():
    return synthetic_scores()


@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_defaults_find_noisy_samples_despite_heavy_tails_and_drift(drifting, method):
    table, noisy = drifting
    binarizer = make_binarizer(method).fit(table)
    assert binarizer.feature == "step_z"
    assert f1_drop(table, binarizer.keep(table), noisy) > 0.95


def test_raw_weights_fail_where_step_z_succeeds(drifting):
    # why the default feature is step_z: on B*w the heavy tail and drift break the mixture
    table, noisy = drifting
    raw = make_binarizer("gmm", feature="norm_weight").fit(table)
    robust = make_binarizer("gmm").fit(table)
    assert f1_drop(table, raw.keep(table), noisy) < f1_drop(table, robust.keep(table), noisy) - 0.1


def test_threshold_default_is_paper_rule_weight_above_uniform(drifting):
    table, _ = drifting
    keep = make_binarizer("threshold").fit(table).keep(table)
    expected = table["weight"].to_numpy(np.float64) > 1.0 / table["batch_size"].to_numpy()
    np.testing.assert_array_equal(keep, expected)


def test_uniform_weights_pick_score_features_and_refuse_weight_features():
    from raymimic.select.binarize import default_feature, informative_weights

    table, noisy = synthetic_scores(n_samples=300, batch=30, seed=3)
    table["weight"] = np.float32(1 / 30)  # recorded under uniform weights (--weighting sgd): B*w = 1 on every row
    assert informative_weights(table) is False and informative_weights(table.drop(columns="weight")) is None
    threshold = make_binarizer("threshold").fit(table)
    assert threshold.feature == "step_z" and threshold.boundary == 0.0 and threshold.params()["weights_informative"] is False
    keep = threshold.keep(table)
    assert 0.3 < keep.mean() < 0.9 and f1_drop(table, keep, noisy) > 0.9  # it no longer drops every sample
    for method in ("threshold", "gmm", "kmeans"):
        with pytest.raises(ValueError, match="recorded under uniform weights"):
            make_binarizer(method, feature="norm_weight").fit(table)
    with pytest.raises(ValueError, match="recorded under uniform weights"):
        make_binarizer("threshold", feature="log_norm_weight").fit(table)
    # the caller may decide from the whole table: informative weights restore the paper's default
    assert make_binarizer("threshold").fit(table, weights_informative=True).feature == "norm_weight"
    assert make_binarizer("threshold").fit(table.drop(columns=["weight", "batch_size"])).feature == "step_z"
    assert [default_feature(m, False) for m in ("threshold", "gmm")] == ["step_z", "step_z"]
    assert make_binarizer("threshold", cut=0.5).fit(table).boundary == 0.5  # an explicit cut stays


def test_threshold_on_a_moderate_table_and_scale_free_variant():
    table, noisy = synthetic_scores(tau=1.0, scale_from=1.0, scale_to=1.0, seed=1)
    assert f1_drop(table, make_binarizer("threshold").fit(table).keep(table), noisy) > 0.8
    table, noisy = synthetic_scores(seed=2)
    z_threshold = make_binarizer("threshold", feature="step_z").fit(table)
    assert f1_drop(table, z_threshold.keep(table), noisy) > 0.9


def test_fit_on_a_sample_apply_to_other_rows(drifting):
    table, noisy = drifting
    stats = StepStats.from_table(table)
    sample = table.sample(300, random_state=0)
    binarizer = make_binarizer("gmm").fit(sample, step_stats=stats)
    keep = np.concatenate([binarizer.keep(part) for part in (table.iloc[i:i + 500] for i in range(0, len(table), 500))])
    assert f1_drop(table, keep, noisy) > 0.95
    assert binarizer.n_fit == 300


def test_step_stats_from_partials_equal_whole_table(drifting):
    table, _ = drifting
    whole = StepStats.from_table(table)
    parts = (table.iloc[i:i + 700] for i in range(0, len(table), 700))
    combined = StepStats.from_partials(pd.concat([StepStats.partials(part) for part in parts]))
    np.testing.assert_allclose(combined.mean, whole.mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(combined.std, whole.std, rtol=1e-9)
    np.testing.assert_array_equal(combined.count, whole.count)


def test_gmm_params_are_json_and_boundary_separates_components(drifting):
    table, _ = drifting
    gmm = make_binarizer("gmm").fit(table)
    params = json.loads(json.dumps(gmm.params()))
    low, high = params["means"]
    assert low < params["boundary"] < high
    assert sum(params["weights"]) == pytest.approx(1.0)
    assert params["bic_2_components"] < params["bic_1_component"]
    post = gmm.posterior_high(np.array([low, params["boundary"], high]))
    assert post[0] < 0.5 and post[1] == pytest.approx(0.5, abs=1e-6) and post[2] > 0.5
    kmeans = make_binarizer("kmeans").fit(table)
    assert kmeans.params()["centers"][0] < kmeans.boundary < kmeans.params()["centers"][1]


def test_gmm_keeps_far_upper_tail_even_when_low_component_is_wider():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(-1, 3.0, 3000), rng.normal(2, 0.3, 3000)])
    table = pd.DataFrame({"uid": "0" * 32, "score": values})
    gmm = make_binarizer("gmm", feature="score").fit(table)
    assert gmm.keep_values(np.array([2.0, 10.0, 50.0])).all()
    assert not gmm.keep_values(np.array([-5.0, -50.0])).any()


@pytest.mark.parametrize("method", ["gmm", "kmeans"])
def test_degenerate_inputs_raise_clear_errors(method):
    empty = pd.DataFrame({c: [] for c in ["uid", "step", "score", "weight", "batch_size"]})
    with pytest.raises(ValueError, match="empty"):
        make_binarizer(method).fit(empty)
    constant = pd.DataFrame({"uid": [f"{i:032x}" for i in range(10)], "step": np.arange(10) % 2, "score": 0.5})
    with pytest.raises(ValueError, match="constant scores"):
        make_binarizer(method).fit(constant)
    with pytest.raises(ValueError, match="distinct"):
        make_binarizer(method, feature="score").fit(constant)
    nan = constant.assign(score=np.r_[np.nan, np.arange(9.0)])
    with pytest.raises(ValueError, match="NaN.*00000000000000000000000000000000"):
        make_binarizer(method).fit(nan)
    with pytest.raises(ValueError, match="no column 'weight'"):
        make_binarizer(method, feature="norm_weight").fit(constant)
    with pytest.raises(ValueError, match="not fitted"):
        make_binarizer(method).keep(constant)


def test_bad_parameters_and_unknown_names():
    with pytest.raises(ValueError, match="unknown binarizer"):
        make_binarizer("median")
    with pytest.raises(ValueError, match="unknown feature"):
        make_binarizer("gmm", feature="loss")
    with pytest.raises(ValueError, match="explicit cut"):
        make_binarizer("threshold", feature="score")
    with pytest.raises(ValueError, match="bad parameters"):
        make_binarizer("gmm", cut=1.0)


def test_degenerate_step_uses_documented_fallback():
    table = pd.DataFrame({"uid": [f"{i:032x}" for i in range(7)], "step": [0, 0, 0, 1, 1, 1, 2],
                          "score": [1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 4.0]})
    stats = StepStats.from_table(table)
    assert stats.degenerate_steps == [2]
    assert stats.std[2] == pytest.approx(np.median(stats.std[:2]))
    z = compute_feature(table, "step_z", stats)
    np.testing.assert_allclose(z[:3], z[3:6])
    assert z[6] == 0.0
    with pytest.raises(ValueError, match="step 9 is not in"):
        stats.standardize(np.array([9]), np.array([1.0]))


def test_vote_rules():
    d = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(vote(d), [True, False, True, False])
    np.testing.assert_array_equal(vote(d, "all"), [False, False, True, False])
    np.testing.assert_array_equal(vote(d, "any"), [True, True, True, False])
    np.testing.assert_array_equal(vote(d, 1 / 3), [True, True, True, False])
    np.testing.assert_array_equal(vote(d, "0.6"), [True, False, True, False])
    # a tie drops; missing votes are not counted
    np.testing.assert_array_equal(vote(np.array([[True, False]])), [False])
    frame = pd.DataFrame({"e0": [True, False], "e1": [pd.NA, False], "e2": [False, pd.NA]}, dtype="boolean")
    np.testing.assert_array_equal(vote(frame, "any"), [True, False])
    np.testing.assert_array_equal(vote(np.array([[1.0, np.nan], [0.0, 1.0]]), "all"), [True, False])
    for bad in ("most", 0.0, 1.5, True):
        with pytest.raises(ValueError, match="rule"):
            vote(d, bad)
    with pytest.raises(ValueError, match="no vote"):
        vote(np.array([[np.nan, np.nan]]))
    with pytest.raises(ValueError, match="keep_votes"):
        vote_from_counts(np.array([1]), np.array([1, 2]))


def test_local_ensemble_filter_and_quality(drifting):
    table, noisy = drifting
    per_uid = MimicFilter(table, method="ensemble", rule="majority", fit_sample=10**6).fit().decisions
    assert len(per_uid) == table["uid"].nunique() and (per_uid["n_obs"] == 2).all()
    truth = per_uid["uid"].map(noisy).to_numpy()
    dropped = ~per_uid["mimic_keep"].to_numpy()
    assert 2 * (dropped & truth).sum() / (dropped.sum() + truth.sum()) > 0.95
    q = quality_estimate(per_uid["mimic_keep"].to_numpy(), per_uid["mean_norm_weight"].to_numpy())
    assert q["fraction_kept"] == pytest.approx(1 - truth.mean(), abs=0.05)
    assert q["mean_score_kept"] > q["mean_score"] > q["mean_score_dropped"]


def test_quality_estimate_rejects_bad_input():
    assert quality_estimate(np.array([True, False]), np.array([2.0, 0.0]))["mean_score"] == 1.0
    with pytest.raises(ValueError, match="empty"):
        quality_estimate(np.array([], bool), np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        quality_estimate(np.array([True]), np.array([np.nan]))
    with pytest.raises(ValueError, match="same length"):
        quality_estimate(np.array([True]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="boolean"):
        quality_estimate(np.array([1]), np.array([1.0]))
