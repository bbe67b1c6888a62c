"""Stage 2's streaming path (score-table URIs): the same decisions as the local pandas path, integer uids end to end."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import lift_table, synthetic_scores

from raymimic.data.uids import arrow_uid_pairs, pair_to_uid, pairs_to_hex, read_subset, uid_pairs, uids_to_array
from raymimic.select.executors.tasks import partition_of
from raymimic.select.mimic_filter import MimicFilter

EXACT = ["uid", "n_obs", "n_steps"]
MEANS = ["mimic_score", "mean_norm_weight", "mean_raw_score"]


def spread_uids(table: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """The table with its uids replaced by random 128-bit ones, so that every partition gets some."""
    rng = np.random.default_rng(seed)
    originals = table["uid"].unique()
    hi, lo = (rng.integers(0, 2**63, len(originals), dtype=np.int64).astype(np.uint64) * 2 + 1 for _ in range(2))
    mapping = dict(zip(originals, [pair_to_uid(h, lo_) for h, lo_ in zip(hi, lo)]))
    return table.assign(uid=table["uid"].map(mapping))


def messy(table: pd.DataFrame) -> pd.DataFrame:
    """Duplicate (uid, step) rows, NaN scores and weights, and a uid seen in one epoch only."""
    rows = table.copy()
    rows.loc[rows.index[5], "score"] = np.nan
    rows.loc[rows.index[17], "weight"] = np.inf
    lone = rows["uid"].iloc[40]
    rows = rows[~((rows["uid"] == lone) & (rows["epoch"] > 0))]
    return pd.concat([rows, rows.iloc[100:110]], ignore_index=True)


def write_files(table: pd.DataFrame, directory, parts: int = 5) -> str:
    """Files of contiguous step ranges, plus one interleaved slice: a uid's rows spread over several files."""
    os.makedirs(directory, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(table)), parts)):
        table.iloc[idx].to_parquet(f"{directory}/{i:05d}.parquet", index=False, row_group_size=97)
    return str(directory)


def assert_same_decisions(got: pd.DataFrame, expected: pd.DataFrame, methods: list[str]) -> None:
    got, expected = got.sort_values("uid", ignore_index=True), expected.sort_values("uid", ignore_index=True)
    exact = EXACT + [f"votes_{m}" for m in methods] + [f"keep_{m}" for m in methods] + ["mimic_keep"]
    for column in exact:
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    floats = MEANS + [c for c in expected.columns if c.startswith("step_z_")]
    for column in floats:
        np.testing.assert_allclose(got[column].to_numpy(), expected[column].to_numpy(), rtol=1e-12, atol=1e-12, err_msg=column)


@pytest.fixture(params=["tasks", "in_process"])
def mode(request, monkeypatch):
    """Every streaming test runs with Ray tasks and in the driver's process (the small-table path)."""
    from raymimic.select.executors import tasks

    monkeypatch.setattr(tasks, "LOCAL_ROWS", 0 if request.param == "tasks" else 10**9)
    return request.param


@pytest.fixture(scope="module")
def messy_table():
    table, _ = synthetic_scores(n_samples=900, batch=30, epochs=3)
    return messy(spread_uids(table))


@pytest.mark.ray
@pytest.mark.parametrize("method", ["gmm", "ensemble", "threshold"])
def test_stream_matches_local_path(ray_session, tmp_path, messy_table, method, mode):
    scores = write_files(messy_table, tmp_path / "scores")
    kwargs = {"method": method, "duplicates": "count", "fit_sample": 10**6}
    streamed = MimicFilter(scores, num_partitions=4, spill_dir=str(tmp_path / "spill"), **kwargs).fit()
    local = MimicFilter(messy_table, **kwargs).fit()
    assert streamed.stats["stage2_tasks"]["in_process"] == (mode == "in_process")
    assert streamed.stats["n_nan_rows"] == 2 and streamed.stats["n_duplicate_rows"] == 10
    assert {k: streamed.stats[k] for k in ("n_rows", "n_uids", "n_nan_rows", "n_duplicate_rows")} == \
        {k: local.stats[k] for k in ("n_rows", "n_uids", "n_nan_rows", "n_duplicate_rows")}
    got = streamed.decisions.to_pandas()
    assert_same_decisions(got, local.decisions, local.methods)
    assert {1, 3} <= set(got["n_steps"]) and got["n_obs"].max() == 4  # the lone uid, the duplicated ones
    assert (tmp_path / "spill" / "plan.json").exists()  # this filter's work, until closed
    streamed.close()
    assert not (tmp_path / "spill").exists()


@pytest.mark.ray
def test_a_fit_sample_smaller_than_the_table_gives_the_same_decisions_whatever_the_layout(ray_session, tmp_path, messy_table, mode):
    """The fit sample is keyed by (uid, step), not drawn per file or block: files, Ray Data blocks and a
    shuffled in-memory table all fit the same binarizers and take the same decisions."""
    scores = write_files(messy_table, tmp_path / "scores", parts=7)
    kwargs = {"method": "ensemble", "duplicates": "count", "fit_sample": 1500, "seed": 3}
    streamed = MimicFilter(scores, num_partitions=3, **kwargs).fit()
    shuffled = MimicFilter(messy_table.sample(frac=1.0, random_state=0), **kwargs).fit()
    reblocked = MimicFilter(ray_session.data.read_parquet(scores).repartition(5), **kwargs).fit()
    assert 1000 < len(streamed.sample) < 2000 < len(messy_table)
    for other in (shuffled, reblocked):
        pd.testing.assert_frame_equal(streamed.sample, other.sample)
    got = streamed.decisions.to_pandas()
    assert_same_decisions(got, shuffled.decisions, shuffled.methods)
    assert_same_decisions(got, reblocked.decisions.to_pandas(), shuffled.methods)
    other_seed = MimicFilter(messy_table, **{**kwargs, "seed": 4}).fit()
    assert not streamed.sample["uid"].equals(other_seed.sample["uid"])  # the seed does choose the rows


@pytest.mark.ray
def test_stream_duplicates_raise_and_top_fraction_matches_ray_data(ray_session, tmp_path, messy_table, mode):
    scores = write_files(messy_table, tmp_path / "scores")
    with pytest.raises(ValueError, match="10 score rows repeat a"):
        MimicFilter(scores, method="gmm", fit_sample=10**6).fit()
    kwargs = {"method": "top-fraction", "fraction": 0.4, "duplicates": "count", "fit_sample": 10**6}
    streamed = MimicFilter(scores, num_partitions=3, **kwargs).fit()
    on_ray_data = MimicFilter(ray_session.data.read_parquet(scores), **kwargs).fit()
    assert streamed.threshold == pytest.approx(on_ray_data.threshold, rel=1e-12)
    got = streamed.decisions.to_pandas()
    assert_same_decisions(got, on_ray_data.decisions.to_pandas(), [])
    assert got["mimic_keep"].mean() == pytest.approx(0.4, abs=0.01)


@pytest.mark.ray
def test_stream_lift_columns_and_file_without_a_control(ray_session, tmp_path, mode):
    table, truth = lift_table(n_samples=400, batch=40, epochs=3)
    table = spread_uids(table)
    scores = write_files(table, tmp_path / "scores", parts=4)
    pd.read_parquet(f"{scores}/00001.parquet").drop(columns="score_fixed").to_parquet(f"{scores}/00001.parquet", index=False)
    lacking = np.array_split(np.arange(len(table)), 4)[1]  # the rows of that file
    local_table = table.assign(score_fixed=table["score_fixed"].where(~np.isin(np.arange(len(table)), lacking)))
    for kwargs in ({"method": "ensemble"}, {"method": "threshold", "score_column": "zero"}):
        streamed = MimicFilter(scores, num_partitions=2, **kwargs).fit()
        local = MimicFilter(local_table, **kwargs).fit()
        assert streamed.lift_value_columns == local.lift_value_columns and len(local.lift_value_columns) == 3
        assert_same_decisions(streamed.decisions.to_pandas(), local.decisions, local.methods)
        sample = streamed.lift_sample(max_uids=150)
        assert 100 < len(sample) < 200 and sample["uid"].is_monotonic_increasing


@pytest.mark.ray
def test_run_filter_keep_npy_is_the_kept_integer_uids(ray_session, tmp_path, messy_table, mode):
    from raymimic.select.pipeline import FilterConfig, run_filter

    scores = write_files(messy_table, tmp_path / "scores", parts=7)
    out = tmp_path / "out"
    summary = run_filter(FilterConfig(scores, str(out), method="ensemble", duplicates="count", fit_sample=10**6))
    decisions = pd.read_parquet(out / "decisions.parquet")
    local = MimicFilter(messy_table, method="ensemble", duplicates="count", fit_sample=10**6).fit().decisions
    np.testing.assert_array_equal(read_subset(str(out / "keep.npy")), uids_to_array(local.loc[local["mimic_keep"], "uid"]))
    assert decisions["uid"].is_unique and summary["n_kept"] == int(decisions["keep"].sum())
    assert sorted(os.listdir(out)) == ["decisions.parquet", "fit_sample.parquet", "keep.npy", "summary.json"]  # no spill left


def test_uid_words_round_trip_from_arrow_buffers():
    rng = np.random.default_rng(0)
    hi, lo = (rng.integers(0, 2**64, 500, dtype=np.uint64) for _ in range(2))
    text = [u.decode() for u in pairs_to_hex(hi, lo)]
    assert text == [pair_to_uid(h, lo_) for h, lo_ in zip(hi, lo)]
    got_hi, got_lo = arrow_uid_pairs(pa.chunked_array([pa.array(text[:200]), pa.array(text[200:]).slice(3)]))
    np.testing.assert_array_equal(got_hi, np.concatenate([hi[:200], hi[203:]]))
    np.testing.assert_array_equal(got_lo, np.concatenate([lo[:200], lo[203:]]))
    np.testing.assert_array_equal(arrow_uid_pairs(pa.array(text[:4], pa.large_string()))[1], lo[:4])
    upper = arrow_uid_pairs(pa.array([text[0].upper()]))  # the slow path normalises as uid_pairs does
    assert upper[0][0] == uid_pairs([text[0]])[0][0]
    with pytest.raises(ValueError, match="malformed uid 'xyz'"):
        arrow_uid_pairs(pa.array(["xyz"]))


def test_partitions_are_uniform_and_follow_uid_order():
    hi = np.sort(np.random.default_rng(0).integers(0, 2**64, 100_000, dtype=np.uint64))
    parts = partition_of(hi, 7)
    assert parts.min() == 0 and parts.max() == 6 and (np.diff(parts) >= 0).all()
    assert np.bincount(parts).min() > 0.95 * len(hi) / 7
    assert partition_of(np.array([2**64 - 1], np.uint64), 1000)[0] == 999


def test_per_uid_reduce_by_words_and_by_strings_agree_with_pandas_and_survive_a_hash_collision():
    from raymimic.data.uids import GOLDEN_GAMMA as _MIX
    from raymimic.select.kernels import per_uid, per_uid_words, uid_groups

    rng = np.random.default_rng(0)
    n = 5000
    hi = rng.integers(0, 2**64, 800, dtype=np.uint64)[rng.integers(0, 800, n)]
    lo = hi * np.uint64(3)
    with np.errstate(over="ignore"):
        colliding = (hi[0] ^ (lo[0] * _MIX)) ^ (np.uint64(7) * _MIX)  # (colliding, 7) hashes as (hi[0], lo[0])
    rows = {"hi": np.append(hi, colliding), "lo": np.append(lo, np.uint64(7)), "step": rng.integers(-1, 40, n + 1)}
    rows.update(mimic_score=rng.standard_normal(n + 1), norm_weight=rng.random(n + 1), raw_score=rng.standard_normal(n + 1),
                votes_gmm=rng.integers(0, 2, n + 1), step_z_score=np.where(rng.random(n + 1) < 0.3, np.nan, rng.standard_normal(n + 1)))
    rows["mimic_score"][:3] = np.nan
    plain = {k: v[:n] for k, v in rows.items()}
    for table in (plain, rows):
        codes, first = uid_groups(table["hi"], table["lo"])
        assert (table["hi"][first][codes] == table["hi"]).all() and (table["lo"][first][codes] == table["lo"]).all()
        frame, fhi, flo = per_uid_words(table, ["gmm"])
        uids = pd.Series([f"{h:016x}{lo_:016x}" for h, lo_ in zip(table["hi"], table["lo"])])
        rows_frame = pd.DataFrame({"uid": uids, **{k: v for k, v in table.items() if k not in ("hi", "lo")}})
        by_string = per_uid(rows_frame, ["gmm"])
        np.testing.assert_array_equal(by_string["uid"].to_numpy(), pairs_to_hex(fhi, flo).astype(str))
        pd.testing.assert_frame_equal(by_string.drop(columns="uid"), frame)
        grouped = rows_frame.groupby("uid", sort=False)
        expected = pd.DataFrame({"n_obs": grouped.size().to_numpy(), "n_steps": grouped["step"].nunique().to_numpy(),
                                 "mimic_score": grouped["mimic_score"].mean().to_numpy(),
                                 "votes_gmm": grouped["votes_gmm"].sum().to_numpy(),
                                 "step_z_score": grouped["step_z_score"].mean().to_numpy()})
        pd.testing.assert_frame_equal(frame[list(expected.columns)], expected, check_exact=False, rtol=1e-12, check_dtype=False)
    assert len(per_uid_words(rows, ["gmm"])[0]) == len(per_uid_words(plain, ["gmm"])[0]) + 1  # the colliding uid stays apart
