"""Stage 2 on Ray Data: the mimic filter end to end, pool join, composite filters, outputs."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from conftest import synthetic_scores

from raymimic.data.uids import read_subset, uids_to_array

pytestmark = pytest.mark.ray


def write_scores(table: pd.DataFrame, directory, parts: int = 3) -> str:
    os.makedirs(directory, exist_ok=True)
    for i in range(parts):
        table.iloc[i::parts].to_parquet(f"{directory}/{i:05d}.parquet", index=False)
    return str(directory)


def write_pool(root, uids, clip_scores, rng) -> str:
    """A pool metadata directory in DataComp's layout (2 parquet files + npz embeddings)."""
    os.makedirs(f"{root}/metadata", exist_ok=True)
    n = len(uids)
    frame = pd.DataFrame({"uid": uids, "url": "http://x", "text": ["a photo of a dog"] * n, "original_width": 300, "original_height": 300,
                          "clip_b32_similarity_score": clip_scores, "clip_l14_similarity_score": clip_scores, "face_bboxes": [[]] * n,
                          "sha256": "0" * 64})
    frame.loc[0, "original_width"] = 100  # fails the basic size rule
    for part, idx in enumerate(np.array_split(np.arange(n), 2)):
        frame.iloc[idx].to_parquet(f"{root}/metadata/{part:08d}.parquet", index=False)
        emb = {k: rng.standard_normal((len(idx), 8)).astype(np.float16) for k in ("b32_img", "b32_txt", "l14_img", "l14_txt")}
        np.savez(f"{root}/metadata/{part:08d}.npz", **emb)
    return str(root)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    table, noisy = synthetic_scores(n_samples=600, batch=30, epochs=2)
    root = tmp_path_factory.mktemp("stage2")
    return table, noisy, write_scores(table, root / "scores"), root


def f1_of_dropped(frame, noisy, keep_column="keep"):
    truth = frame["uid"].map(noisy).to_numpy(bool)
    dropped = ~frame[keep_column].to_numpy(bool)
    return 2 * (dropped & truth).sum() / (dropped.sum() + truth.sum())


def test_cli_ensemble_filter_finds_noisy_samples_and_writes_contract(ray_session, run_dir):
    from raymimic.app.cli import main

    table, noisy, scores, root = run_dir
    out = root / "out_ensemble"
    assert main(["filter", "--scores", scores, "--output", str(out), "--method", "ensemble", "--report"]) == 0
    decisions = pd.read_parquet(out / "decisions.parquet")
    assert len(decisions) == table["uid"].nunique() == decisions["uid"].nunique()
    assert (decisions["n_obs"] == 2).all()
    assert {"uid", "mimic_score", "keep_gmm", "keep_kmeans", "keep_threshold", "keep"} <= set(decisions.columns)
    assert f1_of_dropped(decisions, noisy, "keep_gmm") > 0.95 and f1_of_dropped(decisions, noisy) > 0.9
    votes = pd.read_parquet(out / "decisions.parquet")[["keep_gmm", "keep_kmeans", "keep_threshold"]]
    assert (decisions["keep"] == (votes.sum(axis=1) >= 2)).mean() > 0.95  # majority of 3 methods x 2 epochs
    subset = read_subset(str(out / "keep.npy"))
    expected = uids_to_array(decisions.loc[decisions["keep"], "uid"])
    assert subset.dtype == np.dtype("u8,u8") and np.array_equal(subset, expected)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_kept"] == int(decisions["keep"].sum()) and summary["mimic"]["n_rows"] == len(table)
    assert summary["quality"]["fraction_kept"] == pytest.approx(decisions["keep"].mean())
    gmm = summary["stages"][0]["binarizers"]["gmm"]
    assert gmm["means"][0] < gmm["boundary"] < gmm["means"][1]
    assert (out / "report.md").exists() and (out / "hist_step_z.png").stat().st_size > 1000
    assert main(["report", str(out)]) == 0 and "## Quality estimate" in (out / "report.md").read_text()
    assert summary["lift"] is None and "No control columns recorded" in (out / "report.md").read_text()  # a table without controls


def test_bad_score_tables(ray_session, run_dir, tmp_path):
    from raymimic.select.mimic_filter import MimicFilter

    table, noisy, _, _ = run_dir
    table = table[table["uid"] < f"{200:032x}"]
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['weight'\]"):
        MimicFilter(write_scores(table.drop(columns="weight"), tmp_path / "a", 1)).fit()
    bad = pd.concat([table, table.iloc[:5]], ignore_index=True)
    bad.loc[10:13, "score"] = np.nan
    with pytest.raises(ValueError, match="4 of .* NaN"):
        MimicFilter(write_scores(bad, tmp_path / "b", 1), nan="error").fit()
    f = MimicFilter(str(tmp_path / "b"), method="threshold")
    with pytest.raises(ValueError, match="5 score rows repeat"):
        f.fit()
    assert f.stats["n_nan_rows"] == 4
    with pytest.raises(FileNotFoundError, match="do not exist"):
        MimicFilter(str(tmp_path / "nowhere")).fit()


def test_pool_composite_clip_top_minus_mimic_bottom(ray_session, run_dir):
    from raymimic.select.pipeline import FilterConfig, run_filter

    table, noisy, scores, root = run_dir
    rng = np.random.default_rng(0)
    uids = sorted(table["uid"].unique())
    pool_uids = uids[50:] + [f"{i:032x}".replace("0", "f", 1) for i in range(10)]  # 50 scored uids absent, 10 unscored
    clip = rng.random(len(pool_uids))
    pool = write_pool(root / "pool", pool_uids, clip, rng)
    out = str(root / "out_composite")
    summary = run_filter(FilterConfig(scores, out, pool=pool, method="top-fraction", fraction=0.8, clip_top=0.3, basic=True))
    d = pd.read_parquet(f"{out}/decisions.parquet")
    assert len(d) == len(pool_uids)
    counts = summary["pool_counts"]
    assert counts["n_pool_uids_without_score"] == 10 and counts["n_score_uids_absent_from_pool"] == 50
    assert d["clip_keep"].mean() == pytest.approx(0.3, abs=0.01)
    scored = d[d["mimic_scored"] == 1]
    assert scored["mimic_keep"].mean() == pytest.approx(0.8, abs=0.05)  # the bottom 20% of all scored uids is dropped
    assert scored.loc[scored["mimic_keep"], "mimic_score"].min() > scored.loc[~scored["mimic_keep"], "mimic_score"].max()
    expected = d["clip_keep"] & d["mimic_keep"] & d["basic_keep"]
    np.testing.assert_array_equal(d["keep"], expected)
    assert not d.loc[d["mimic_scored"] == 0, "keep"].any() and not d.loc[d["uid"] == pool_uids[0], "basic_keep"].any()
    assert summary["n_kept"] == int(expected.sum()) > 0


def test_approximate_quantile_matches_numpy(ray_session):
    import ray

    from raymimic.select.quantile import approximate_quantiles

    values = np.random.default_rng(0).lognormal(size=5000)
    ds = ray.data.from_pandas(pd.DataFrame({"x": values})).repartition(4)
    q = approximate_quantiles(ds, "x", [0.1, 0.5, 0.7])
    np.testing.assert_allclose(q, np.quantile(values, [0.1, 0.5, 0.7]), atol=(values.max() - values.min()) / (1 << 16) * 2)


def test_uid_pairs_match_reference_and_reject_bad_uids():
    from raymimic.data.uids import uid_pairs, uid_to_pair

    uids = [f"{i * 7919:032x}" for i in range(50)] + ["f" * 32, "0123456789ABCDEFabcdef0123456789"]
    hi, lo = uid_pairs(np.array(uids, dtype=object))
    ref = np.array(sorted(uid_to_pair(u.lower()) for u in uids), dtype="u8,u8")  # plain Python int parsing
    got = np.sort(np.array(list(zip(hi, lo)), dtype="u8,u8"), order=["f0", "f1"])
    assert np.array_equal(got, ref)
    with pytest.raises(ValueError, match="malformed uid 'xyz'"):
        uid_pairs(np.array(["xyz"], dtype=object))


def test_cli_reference_lift_and_score_column_on_ray(ray_session, tmp_path):
    """The Ray path: control columns (one file without score_fixed), --ground-truth, --report; --score-column zero; same as locally."""
    from conftest import lift_table

    from raymimic.app.cli import main
    from raymimic.select.mimic_filter import MimicFilter

    table, truth = lift_table(n_samples=300, batch=30)
    scores = write_scores(table, tmp_path / "scores")
    pd.read_parquet(f"{scores}/00002.parquet").drop(columns="score_fixed").to_parquet(f"{scores}/00002.parquet", index=False)
    truth.to_parquet(tmp_path / "ground_truth.parquet", index=False)
    out = tmp_path / "out"
    argv = ["filter", "--scores", scores, "--output", str(out), "--method", "ensemble",
            "--ground-truth", str(tmp_path / "ground_truth.parquet")]
    assert main([*argv, "--report"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lift = summary["lift"]
    assert summary["score_column"] == "score" and summary["stages"][0]["features"]["threshold"] == "norm_weight"
    assert set(lift["columns"]) == {"score", "score_fixed", "score_zero"} and lift["ground_truth"] is True
    assert lift["reference_lift"] == pytest.approx(0.5, abs=0.1) and lift["columns"]["score_zero"]["uids"] == 300
    assert 200 < lift["columns"]["score_fixed"]["uids"] < 300  # uids whose every row is in the file without it have none
    assert lift["ground_truth_path"].endswith("ground_truth.parquet") and lift["n_matched_uids"] == 300
    decisions = pd.read_parquet(out / "decisions.parquet")
    assert {"step_z_score", "step_z_score_fixed", "step_z_score_zero"} <= set(decisions.columns)
    unfixed = table.iloc[2::3]  # the rows of the file without score_fixed
    local_table = table.assign(score_fixed=table["score_fixed"].where(~table.index.isin(unfixed.index)))
    local = MimicFilter(local_table, method="ensemble").fit()
    local_lift = local.reference_lift(truth)
    for key in ("reference_lift", "reference_lift_f1", "n_kept"):
        assert lift[key] == pytest.approx(local_lift[key], rel=1e-9), key
    for column, row in local_lift["columns"].items():
        numbers = {k: v for k, v in row.items() if not isinstance(v, str)}
        assert {k: lift["columns"][column][k] for k in numbers} == pytest.approx(numbers, rel=1e-9), column
    report = (out / "report.md").read_text()
    assert "## Reference lift" in report and "| `score_zero` | control | 300 |" in report and "AUC either sign" in report
    assert "score column: `score`; binarizer features: gmm: `step_z`, kmeans: `step_z`, threshold: `norm_weight`" in report
    # --score-column zero on Ray decides as the local path does
    out_zero = tmp_path / "out_zero"
    assert main(["filter", "--scores", scores, "--output", str(out_zero), "--method", "threshold", "--score-column", "zero"]) == 0
    summary = json.loads((out_zero / "summary.json").read_text())
    assert summary["score_column"] == "score_zero" and summary["mimic"]["features"] == {"threshold": "step_z"}
    assert summary["lift"]["ground_truth"] is False and "no ground truth" in summary["lift"]["verdict"]
    got = pd.read_parquet(out_zero / "decisions.parquet").sort_values("uid", ignore_index=True)
    expected = MimicFilter(local_table, method="threshold", score_column="zero").fit().decisions
    np.testing.assert_array_equal(got["keep"].to_numpy(), expected["mimic_keep"].to_numpy())
