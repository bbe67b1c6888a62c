"""The reference-lift study: questions, AUCs, lift, gates, and one small in-process run end to end."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raymimic_experiments.reference_lift.metrics import (
    detection_aucs,
    format_gates,
    gate_checks,
    lift,
    per_uid,
    question_masks,
    seen_aucs,
    steps_to_reach,
)


def _truth() -> pd.DataFrame:
    # classes A (relabel source), B; kinds: clean A x4, relabelled A x2, clean B x4, swapped x2
    return pd.DataFrame({
        "uid": [f"u{i}" for i in range(12)],
        "kind": ["clean"] * 4 + ["relabelled"] * 2 + ["clean"] * 4 + ["swapped_caption"] * 2,
        "class_name": ["A"] * 6 + ["B"] * 6,
    })


def test_the_systematic_question_compares_with_clean_samples_of_the_same_classes():
    masks = question_masks(_truth())
    rows, noisy = masks["systematic"]
    assert rows.tolist() == [True] * 6 + [False] * 6 and noisy[rows].tolist() == [False] * 4 + [True] * 2
    rows, noisy = masks["random"]
    assert rows.sum() == 10 and noisy[rows].sum() == 2  # clean of every class vs random corruption, relabelled left out
    assert masks["all"][1].sum() == 4


def test_aucs_lift_and_the_class_confound():
    truth = _truth()
    # "score" flags relabelled within class A; "score_zero" only dislikes class A (a class confound)
    values = pd.DataFrame({
        "score": [1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0],
        "score_zero": [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
    }, index=truth["uid"], dtype=float)
    aucs = detection_aucs(values, truth)
    assert aucs.loc["score", "systematic"] == 1.0 and aucs.loc["score", "random"] == 1.0
    assert aucs.loc["score_zero", "systematic"] == 0.5  # no better than chance once the class is held fixed
    from raymimic.select.quality import drop_auc

    naive = (truth["kind"] != "swapped_caption").to_numpy()  # relabelled vs every clean sample: the confound looks like skill
    assert drop_auc(values["score_zero"].to_numpy()[naive], (truth["kind"] == "relabelled").to_numpy()[naive]) > 0.7
    result = lift(aucs, "score")
    assert result["systematic"] == pytest.approx(0.5)
    # a control that ranks upside down counts with its sign flipped
    flipped = values.assign(score_zero=-values["score"])
    assert lift(detection_aucs(flipped, truth), "score")["systematic"] == pytest.approx(0.0)
    # the target's own loss is a control too: where it flags the relabelled samples, the reference adds nothing
    with_loss = values.assign(score_loss=values["score"])
    assert lift(detection_aucs(with_loss, truth), "score")["systematic"] == pytest.approx(0.0)


def test_per_uid_standardises_within_each_step():
    # step 0: 1, 2, 3 -> z -1, 0, 1; step 1: 10, 30, 20 -> z -1, 1, 0 (sample standard deviation)
    rows = pd.DataFrame({"uid": ["a", "b", "c"] * 2, "step": [0, 0, 0, 1, 1, 1], "score": [1.0, 2.0, 3.0, 10.0, 30.0, 20.0]})
    z = per_uid(rows)["score"]
    assert z.to_dict() == pytest.approx({"a": -1.0, "b": 0.5, "c": 0.5})  # raw means (5.5, 16, 11.5) would rank b above c


def test_gates_pass_only_when_the_reference_knows_and_the_target_does_not():
    truth = _truth()
    relabelled = (truth["kind"] == "relabelled").to_numpy()
    knows = np.where(relabelled, 5.0, 1.0)
    blind = np.ones(len(truth))
    passed = gate_checks(truth, reference_loss=knows, target_loss=blind)
    assert passed["passed"] and passed["reference_loss_auc"] == 1.0 and passed["target_loss_auc"] == 0.5
    failed = gate_checks(truth, reference_loss=knows, target_loss=knows)
    assert not failed["passed"] and not failed["target_does_not"]
    assert "gate 2 [FAIL]" in format_gates(failed) and "gate 1 [PASS]" in format_gates(failed)
    with pytest.raises(ValueError, match="relabel > 0"):
        gate_checks(truth.assign(kind="clean"), knows, blind)


def test_a_small_run_records_scores_controls_alignment_and_filters(tmp_path):
    import torch

    from raymimic.select.quality import detection_metrics
    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.metrics import evaluate_model, filter_detection
    from raymimic_experiments.reference_lift.score import score_checkpoints
    from raymimic_experiments.reference_lift.train import RunSpec, new_model, train
    from raymimic_experiments.toy_pool import make_toy_pool

    torch.set_num_threads(1)
    pool = str(tmp_path / "pool")
    make_toy_pool(pool, samples=256, noise=0.2, seed=1, shard_size=128, eval_samples=32, relabel=0.1, workers=1)
    data, evaluation = load_split(pool, "raymimic-tiny"), load_split(pool, "raymimic-tiny", "eval")
    assert len(data) == 256 and evaluation.labels is not None
    truth = pd.read_parquet(f"{pool}/ground_truth.parquet").set_index("uid").loc[data.uids].reset_index()
    reference = new_model("raymimic-tiny", 9)
    spec = RunSpec(epochs=2, batch=64, controls=("zero", "fixed"), baselines=("loss",), checkpoints=2)
    run = train(spec, data, reference=reference)
    assert len(run.rows) == 2 * 4 * 64 and run.rows.groupby("step").size().eq(64).all()
    assert {"score", "weight", "score_zero", "score_fixed", "score_loss"} <= set(run.rows.columns)
    assert np.allclose(run.rows["weight"], 1 / 64)  # uniform weights: the scores are recorded, not used
    assert [epoch for epoch, _ in run.checkpoints] == [1, 2]
    rows, reports = score_checkpoints(run, "raymimic-tiny", data, reference, "image-proj", others={"same": reference},
                                      batch=64, align_samples=128)
    assert {"score_aligned", "score_aligned_fixed", "score_same", "score_same_fixed", "score_init", "score_random"} <= set(rows.columns)
    assert np.allclose(rows["score_same"], rows["score"], atol=1e-5)  # the same reference under two names
    assert [(r["epoch"], r["layer"]) for r in reports] == [(1, "image-proj"), (2, "image-proj")]
    result = filter_detection(run.rows, truth)
    noisy = (truth["kind"] != "clean").to_numpy()
    assert result["keep"].shape == (256,) and result["kept"] == int(result["keep"].sum())
    assert result["f1"] == pytest.approx(detection_metrics(result["keep"], noisy)["f1"])  # the dropped uids, scored against the truth
    # one class name: every image is predicted class 0, so the accuracy is the share of label 0 (top-5 too)
    scores = evaluate_model(run.model, "raymimic-tiny", evaluation, ["red circle"], ["a {}."])
    assert scores["top1"] == scores["top5"] == pytest.approx(np.mean(evaluation.labels == 0))
    assert 0 <= scores["image_to_text_r5"] <= 1 and 0 <= scores["text_to_image_r5"] <= 1


def test_seen_aucs_reward_a_column_that_is_higher_on_the_samples_the_reference_saw():
    values = pd.DataFrame({"knows": [3.0, 2.0, 1.0, 0.0], "inverted": [0.0, 1.0, 2.0, 3.0], "flat": [1.0, 1.0, 1.0, 1.0]},
                          index=["a", "b", "c", "d"])
    aucs = seen_aucs(values, {"a", "b"})
    assert aucs["knows"] == 1.0 and aucs["inverted"] == 0.0 and aucs["flat"] == 0.5


def test_steps_to_reach_is_the_first_evaluation_at_or_above_the_target():
    curve = [{"step": 30, "top1": 0.4}, {"step": 10, "top1": 0.2}, {"step": 20, "top1": 0.5}]
    assert steps_to_reach(curve, 0.45) == 20 and steps_to_reach(curve, 0.2) == 10
    assert steps_to_reach(curve, 0.6) is None


def test_training_is_evaluated_every_eval_every_steps_and_at_the_end(tmp_path):
    import torch

    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.train import RunSpec, new_model, train
    from raymimic_experiments.toy_pool import make_toy_pool

    torch.set_num_threads(1)
    pool = str(tmp_path / "pool")
    make_toy_pool(pool, samples=128, noise=0.2, seed=2, shard_size=128, eval_samples=0, workers=1)
    data = load_split(pool, "raymimic-tiny")
    seen = []

    def evaluate(model):
        seen.append(model.training)
        return {"top1": float(len(seen))}

    run = train(RunSpec(epochs=3, batch=32), data, evaluate=evaluate, eval_every=5)  # 4 steps an epoch, 12 in all
    assert [p["step"] for p in run.curve] == [5, 10, 12] and [p["top1"] for p in run.curve] == [1.0, 2.0, 3.0]
    assert all(seen)  # the hook sees the model as training left it
    # Grad-Mimic re-weighting along a control (no reference knowledge) runs through the same harness
    run = train(RunSpec(epochs=1, batch=32, weighting="grad-mimic", direction="zero"), data, reference=new_model("raymimic-tiny", 7))
    assert len(run.rows) == 128 and np.allclose(run.rows.groupby("step")["weight"].sum(), 1.0, atol=1e-5)
    assert np.array_equal(run.rows["score"].to_numpy(), run.rows["score_zero"].to_numpy())
