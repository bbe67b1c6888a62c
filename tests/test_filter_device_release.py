"""A filter stage's device copy of its large state (negCLIPLoss's bank, NormSim's targets) lives as long as the stage:
held by the stage's actor between calls, released by its close() (which Ray Data runs when it drops the actor at the
stage's end), and gone with the actor once the stage has finished."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from raymimic.select.filters import negclip_score_frame, norm_sim, normsim_score_frame, prepare_targets
from raymimic.select.filters.common import DeviceStates, StreamedScorer, score_stage


def _rows(n: int, dim: int = 16, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "l14_img": list(rng.standard_normal((n, dim)).astype(np.float32)),
                         "l14_txt": list(rng.standard_normal((n, dim)).astype(np.float32))})


NORMSIM_KWARGS = {"score_column": "s", "column": "l14_img", "chunk_rows": 8, "chunk_targets": 32, "num_gpus": 0}


def test_a_scorer_holds_one_device_copy_across_calls_and_close_releases_it():
    targets = np.random.default_rng(1).standard_normal((100, 16)).astype(np.float32)
    scorer = StreamedScorer(normsim_score_frame, prepare_targets(targets, p=np.inf), NORMSIM_KWARGS)
    rows = _rows(30)
    first = scorer(rows.iloc[:12].copy())
    held = scorer.device_states.tensors(scorer.state, ("targets",), "cpu")
    second = scorer(rows.iloc[12:].copy())
    assert len(scorer.device_states) == 1
    assert scorer.device_states.tensors(scorer.state, ("targets",), "cpu") is held  # the same copy, not made again
    expected = norm_sim(np.stack(rows["l14_img"]), targets, p=np.inf)
    np.testing.assert_allclose(np.concatenate([first["s"], second["s"]]), expected, rtol=0, atol=1e-6)
    scorer.close()
    assert len(scorer.device_states) == 0


def test_device_states_hold_one_state_at_a_time():
    states = DeviceStates()
    a = prepare_targets(np.eye(4, dtype=np.float32), p=2)
    b = prepare_targets(np.eye(4, dtype=np.float32), p=2)
    states.tensors(a, ("gram",), "cpu")
    states.tensors(b, ("gram",), "cpu")
    assert len(states) == 1
    states.release()
    assert len(states) == 0


def test_a_scoring_call_without_an_owner_keeps_nothing():
    """The in-process path (``score_batch``) and the task path: each call's copy is dropped when it returns."""
    held = DeviceStates()
    state = prepare_targets(np.random.default_rng(2).standard_normal((50, 16)), p=np.inf)
    normsim_score_frame(_rows(5), state, **NORMSIM_KWARGS)
    normsim_score_frame(_rows(5), state, **NORMSIM_KWARGS, device_states=held)
    assert len(held) == 1  # only a given owner keeps it


def _actor_state(actor_id: str) -> str:
    from ray._private.state import actors

    return actors(actor_id)["State"]


@pytest.mark.ray
def test_the_stage_actor_and_its_device_copy_are_gone_once_the_stage_has_finished(ray_session):
    def score_and_report(batch: pd.DataFrame, state, device_states=None, **kwargs) -> pd.DataFrame:
        """normsim_score_frame, plus which actor scored the rows and how many device copies it held."""
        import ray

        out = normsim_score_frame(batch, state, **kwargs, device_states=device_states)
        out["actor"] = ray.get_runtime_context().get_actor_id()
        out["held"] = len(device_states)
        return out

    rows = _rows(40, seed=3)
    targets = np.random.default_rng(4).standard_normal((64, 16)).astype(np.float32)
    state = prepare_targets(targets, p=np.inf)
    ds = ray_session.data.from_pandas(rows).repartition(4)
    out = score_stage(ds, score_and_report, ray_session.put(state), NORMSIM_KWARGS, rows_per_call=10, actors=1).to_pandas()
    assert out["held"].tolist() == [1] * 40  # held between calls for the whole stage
    out = out.set_index("uid").loc[rows["uid"]]
    np.testing.assert_allclose(out["s"], norm_sim(np.stack(rows["l14_img"]), targets, p=np.inf), rtol=0, atol=1e-6)
    (actor_id,) = set(out["actor"])
    deadline = time.monotonic() + 30
    while _actor_state(actor_id) != "DEAD" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _actor_state(actor_id) == "DEAD"


@pytest.mark.ray
def test_negclip_scores_on_stage_actors_equal_those_of_tasks(ray_session):
    from raymimic.select.filters import NegCLIPLossFilter

    rows = _rows(60, seed=5)
    stage = NegCLIPLossFilter(batch_size=16, k=2, tau=0.05, chunk_rows=8, chunk_bank=8)
    stage.draw_bank(rows)
    kwargs = {"score_column": "s", "image_column": "l14_img", "text_column": "l14_txt", "key_column": "uid", "tau": 0.05,
              "chunk_rows": 8, "chunk_bank": 8, "num_gpus": 0}
    ds = ray_session.data.from_pandas(rows).repartition(3)
    bank = ray_session.put(stage.bank)
    on_actors = score_stage(ds, negclip_score_frame, bank, kwargs, rows_per_call=16, actors=1).to_pandas().set_index("uid")
    on_tasks = score_stage(ds, negclip_score_frame, bank, kwargs, rows_per_call=16).to_pandas().set_index("uid")
    np.testing.assert_array_equal(on_actors.loc[rows["uid"], "s"], on_tasks.loc[rows["uid"], "s"])
    np.testing.assert_array_equal(on_tasks.loc[rows["uid"], "s"], stage.score_batch(rows))
