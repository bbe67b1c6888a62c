"""The score-only pass's calls: several scoring batches per map_batches call give the rows the same batches give
one call each (raymimic.train.score_only.MimicScorer with micro_batch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

MODEL = "raymimic-tiny"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from raymimic.clip import create_model, save_checkpoint

    folder = tmp_path_factory.mktemp("score_only_calls")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(create_model(MODEL)[0], str(folder / "model.pt"), MODEL, step=3, epoch=0)
    torch.manual_seed(1)
    return checkpoint, save_checkpoint(create_model(MODEL)[0], str(folder / "ref.pt"), MODEL)


def _rows(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"uid": np.asarray([f"{i:032x}" for i in range(n)], dtype=object),
            "image": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), "text": rng.integers(1, 400, (n, 16)).astype(np.int64)}


def test_micro_batches_of_one_call_give_the_rows_of_one_call_per_batch(checkpoints):
    from raymimic.train.score_only import MimicScorer

    checkpoint, reference = checkpoints
    options = dict(tau=0.5, controls=["zero", "random"], baselines=["loss"])
    one_call = MimicScorer(MODEL, checkpoint, reference, micro_batch=5, **options)
    call_per_batch = MimicScorer(MODEL, checkpoint, reference, **options)
    rows = _rows(14)
    got = one_call(rows)
    parts = [call_per_batch({column: values[start:start + 5] for column, values in rows.items()}) for start in (0, 5, 10)]
    assert set(got) == set(parts[0]) >= {"score", "weight", "score_zero", "score_random", "score_loss"}
    for column in got:
        np.testing.assert_array_equal(got[column], np.concatenate([part[column] for part in parts]), err_msg=column)
    assert got["batch_size"].tolist() == [5] * 10 + [4] * 4 and set(got["step"]) == {3}


def test_a_call_of_one_batch_is_unchanged_by_the_micro_batch_size(checkpoints):
    from raymimic.train.score_only import MimicScorer

    checkpoint, reference = checkpoints
    rows = _rows(6, seed=1)
    plain, larger = MimicScorer(MODEL, checkpoint, reference)(rows), MimicScorer(MODEL, checkpoint, reference, micro_batch=64)(rows)
    for column in plain:
        np.testing.assert_array_equal(plain[column], larger[column], err_msg=column)


def test_score_dataset_refuses_an_empty_call(checkpoints):
    from raymimic.train.score_only import score_dataset

    with pytest.raises(ValueError, match="batches_per_call must be at least 1, got 0"):
        score_dataset(None, MODEL, *checkpoints, batches_per_call=0)
