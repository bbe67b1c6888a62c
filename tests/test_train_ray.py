"""Stage 1 on Ray Train with 2 CPU workers: kill-and-resume, and equivalence with one process.

A single TorchTrainer.fit() (each costs ~20 s here) whose rank 1 dies once mid-run: its score
table must hold exactly one row per (uid, step) in the same data order, and a single-process
replay of its global batches must reproduce its scores, weights and final weights (which
also proves the resume restored model and optimizer exactly), and its control and baseline
columns (``init`` and ``fixed`` after the resume use the first attempt's ``W_0``, saved in the
checkpoint).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.compute as pc
import pytest
import torch

from raymimic.clip import create_model, resolve_mimic_layer, save_checkpoint
from raymimic.mimic import get_parameter
from raymimic.score_table import read_score_table
from raymimic.train.config import TrainConfig
from raymimic.train.loop import build_optimizer, learning_rate
from raymimic.train.step import MimicStep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROWS = 24  # 3 global batches of 8 per pass: 4 steps wrap into a second epoch
CONTROLS = ["zero", "fixed", "init", "random"]
BASELINES = ["loss", "ref_loss", "rho", "ref_clipscore"]
EXTRA = sorted(f"score_{n}" for n in CONTROLS + BASELINES)


def _items():
    rng = np.random.default_rng(0)
    return [
        {
            "uid": f"{i:032x}",
            "image": rng.standard_normal((3, 32, 32)).astype(np.float32),
            "text": rng.integers(1, 400, size=16).astype(np.int64),
        }
        for i in range(ROWS)
    ]


def _config(output, reference, **overrides) -> TrainConfig:
    values = dict(
        output=str(output), model="raymimic-tiny", reference=str(reference), weighting="grad-mimic", tau=0.5,
        samples_seen=32, global_batch=8, lr=1e-3, warmup=2, workers=2, checkpoint_every=2,
        score_flush_every=1, log_every=1, progress=False, max_failures=2, controls=CONTROLS, baselines=BASELINES,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    """ONE fit: rank 1 dies once at step 3 (after the checkpoint at step 2), the run resumes."""
    from raymimic.train import loop
    from raymimic.train.trainer import fit

    root = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(123)
    reference = save_checkpoint(create_model("raymimic-tiny")[0], str(root / "reference.pt"), "raymimic-tiny")
    items = _items()
    cfg = _config(root / "run", reference)
    loop.injected_crash = loop.InjectedCrash(step=3, rank=1)  # module-scoped fixture: set and reset by hand
    try:
        summary = fit(cfg, ray_session.data.from_items(items))
    finally:
        loop.injected_crash = None
    return {"cfg": cfg, "reference": reference, "items": {it["uid"]: it for it in items}, "summary": summary}


def _check_exactly_once(table, steps: int, batch: int):
    assert table.num_rows == steps * batch
    pairs = {(u, s) for u, s in zip(table["uid"].to_pylist(), table["step"].to_pylist())}
    assert len(pairs) == table.num_rows, "a (uid, step) pair appears twice"
    assert sorted(set(table["step"].to_pylist())) == list(range(steps))
    assert set(table["batch_size"].to_pylist()) == {batch}


def _rows_of_step(table, step: int) -> list[dict]:
    return table.filter(pc.equal(table["step"], step)).to_pylist()


def test_killed_worker_resumes_with_exactly_once_scores_and_same_data_order(run):
    cfg, summary = run["cfg"], run["summary"]
    assert (Path(cfg.output) / ".crash-injected-step-3").exists(), "the injected crash did not happen"
    table = read_score_table(summary.scores)
    assert table.schema.names == ["uid", "step", "epoch", "rank", "score", "weight", "batch_size", *EXTRA]
    assert [str(t) for t in table.schema.types] == ["string", "int64", "int32", "int32", "float", "float", "int32"] + ["float"] * 8
    for column in EXTRA:  # score_zero, score_fixed, ... on every row, finite
        values = table[column].to_numpy(zero_copy_only=False)
        assert table[column].null_count == 0 and np.isfinite(values).all(), column
    _check_exactly_once(table, cfg.total_steps, cfg.global_batch)
    assert not [p for p in (Path(cfg.output) / "scores").iterdir() if p.name.startswith(".tmp-")]
    # epoch 0 (steps 0-2, the last one trained before AND after the crash) sees every sample once
    epoch0 = [r for s in range(3) for r in _rows_of_step(table, s)]
    assert sorted(r["uid"] for r in epoch0) == sorted(run["items"])
    assert {r["epoch"] for r in epoch0} == {0}
    # the resumed attempt keeps the data order: epoch 1 starts with epoch 0's first batch, same ranks
    first = {(r["uid"], r["rank"]) for r in _rows_of_step(table, 0)}
    assert {(r["uid"], r["rank"]) for r in _rows_of_step(table, 3)} == first
    assert {r["epoch"] for r in _rows_of_step(table, 3)} == {1}


def test_two_workers_match_single_process(run):
    """Scores, weights and the trained weights equal a one-process replay of the same global batches."""
    cfg, summary = run["cfg"], run["summary"]
    table = read_score_table(summary.scores)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model)[0]
    name = resolve_mimic_layer(model, cfg.mimic_layer)
    reference = create_model(cfg.model, pretrained=run["reference"])[0].eval()
    step = MimicStep(model, name, "grad-mimic", tau=cfg.tau, reference_weight=get_parameter(reference, name).detach(),
                     reference_model=reference, controls=CONTROLS, baselines=BASELINES, seed=cfg.seed)  # W_0: the seeded init
    # the Ray checkpoint keeps W_0 (the mimic layer at step 0), which init and fixed score against after a resume
    saved = torch.load(Path(summary.ray_checkpoint) / "train_state.pt", weights_only=True)
    torch.testing.assert_close(saved["initial_weight"], get_parameter(model, name).detach(), rtol=0, atol=0)
    optimizer = build_optimizer(model, cfg)
    for s in range(cfg.total_steps):
        rows = _rows_of_step(table, s)
        batch = [run["items"][r["uid"]] for r in rows]
        images = torch.as_tensor(np.stack([b["image"] for b in batch]))
        texts = torch.as_tensor(np.stack([b["text"] for b in batch]))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(s, cfg)
        optimizer.zero_grad(set_to_none=True)
        result = step(images, texts)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        np.testing.assert_allclose([r["score"] for r in rows], result.scores.numpy(), rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose([r["weight"] for r in rows], result.weights.numpy(), rtol=2e-3, atol=1e-6)
        for column in EXTRA:  # step 3 ran after the resume: init and fixed still against the first attempt's W_0
            np.testing.assert_allclose([r[column] for r in rows], result.extra[column].numpy(), rtol=2e-3, atol=1e-5,
                                       err_msg=f"{column} at step {s}")

    # the trained model, loaded as an open_clip checkpoint, equals the single-process one
    trained, _, _ = open_clip.create_model_and_transforms(cfg.model, pretrained=summary.final_checkpoint)
    expected = model.state_dict()
    for param_name, value in trained.state_dict().items():
        want = expected[param_name]
        if param_name.endswith("attn.in_proj_bias"):
            # the key bias has a mathematically zero gradient (softmax is shift invariant), so
            # AdamW turns float noise into +-lr steps: compare only the query and value parts
            third = value.shape[0] // 3
            value, want = torch.cat([value[:third], value[2 * third:]]), torch.cat([want[:third], want[2 * third:]])
        torch.testing.assert_close(value, want, rtol=1e-3, atol=2e-5, msg=param_name)
    assert summary.metrics["step"] == cfg.total_steps
    for key in ("loss", "score_mean", "score_std", "frac_above_uniform", "samples_per_s"):
        assert math.isfinite(summary.metrics[key]), key
