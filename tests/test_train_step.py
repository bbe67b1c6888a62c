"""One Stage-1 step in a single process: gradients, scores and weights against direct computations."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import gloo_group

from raymimic.clip import create_model, resolve_mimic_layer
from raymimic.clip.loss import contrastive_loss
from raymimic.mimic import MimicProbe, get_parameter, softmax_weights
from raymimic.train.step import MimicStep

MODEL = "raymimic-tiny"


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model(MODEL)[0]


def _batch(n: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=generator)
    texts = torch.randint(1, 400, (n, 16), generator=generator)
    return images, texts


@pytest.fixture(scope="module")
def setup():
    model, reference = _model(0), _model(1)
    name = resolve_mimic_layer(model, "image-mlp")
    return model, reference, name


def _plain_grad(model, name, images, texts):
    model.zero_grad()
    image_features, text_features, scale = model(images, texts)
    contrastive_loss(image_features, text_features, scale).backward()
    return get_parameter(model, name).grad.clone()


def test_uniform_weights_reproduce_plain_gradient(setup):
    model, reference, name = setup
    model = copy.deepcopy(model)
    images, texts = _batch()
    expected = _plain_grad(model, name, images, texts)
    model.zero_grad()
    step = MimicStep(model, name, "sgd", reference_weight=get_parameter(reference, name).detach())
    result = step(images, texts)
    torch.testing.assert_close(get_parameter(model, name).grad, expected, rtol=1e-4, atol=1e-6)
    assert torch.allclose(result.weights, torch.full((6,), 1 / 6))
    assert torch.isfinite(result.scores).all()


def test_grad_mimic_step_matches_materialised_per_sample_gradients(setup):
    model, reference, name = setup
    model = copy.deepcopy(model)
    images, texts = _batch()
    w_ref = get_parameter(reference, name).detach()
    # direct computation: materialise g_i = B * G_i and apply the paper's formulas
    probe = MimicProbe(model, name)
    with probe.capture():
        image_features, text_features, scale = model(images, texts)
        loss = contrastive_loss(image_features, text_features, scale)
    loss.backward()
    per_sample = 6 * probe.per_sample_grads()
    direction = w_ref - get_parameter(model, name).detach()
    scores = -(per_sample * direction).sum(dim=(1, 2)) / direction.norm()
    weights = softmax_weights(scores, 0.5)
    expected_grad = (weights[:, None, None] * per_sample).sum(0)

    model.zero_grad()
    result = MimicStep(model, name, "grad-mimic", tau=0.5, reference_weight=w_ref)(images, texts)
    torch.testing.assert_close(result.scores, scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.weights, weights, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(get_parameter(model, name).grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(result.loss, loss.detach())
    # every other tensor keeps the plain batch gradient: an ordinary backward of the mean
    # contrastive loss on an untouched copy of the same weights
    plain = copy.deepcopy(setup[0])
    plain.zero_grad()
    contrastive_loss(*plain(images, texts)[:3]).backward()
    others = [(n, p) for n, p in plain.named_parameters() if n != name and p.grad is not None]
    assert "visual.proj" in dict(others) and "logit_scale" in dict(others)
    for other, p in others:
        torch.testing.assert_close(get_parameter(model, other).grad, p.grad, rtol=1e-4, atol=1e-6, msg=lambda m, o=other: f"{o}: {m}")
    # and the re-weighted mimic layer really differs from it (tau 0.5 is far from uniform)
    assert not torch.allclose(expected_grad, get_parameter(plain, name).grad, rtol=1e-3, atol=1e-6)


def test_gradient_checkpointing_keeps_scores(setup):
    model, reference, name = setup
    w_ref = get_parameter(reference, name).detach()
    images, texts = _batch()
    plain = copy.deepcopy(model)
    expected = MimicStep(plain, name, "grad-mimic", tau=0.5, reference_weight=w_ref)(images, texts)
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    checkpointed.train()
    got = MimicStep(checkpointed, name, "grad-mimic", tau=0.5, reference_weight=w_ref)(images, texts)
    torch.testing.assert_close(got.scores, expected.scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(get_parameter(checkpointed, name).grad, get_parameter(plain, name).grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weighting", ["grad-norm", "agra", "rho", "grad-match"])
def test_baseline_weightings_run_and_sum_to_one(setup, weighting):
    model, reference, name = setup
    model = copy.deepcopy(model)
    w_ref = get_parameter(reference, name).detach()
    step = MimicStep(model, name, weighting, tau=1.0, reference_weight=w_ref, reference_model=reference)
    for seed in (1, 2):  # agra compares with the previous step's batch
        model.zero_grad()
        result = step(*_batch(seed=seed))
        assert result.weights.shape == (6,)
        assert torch.isclose(result.weights.sum(), torch.tensor(1.0), atol=1e-5)
        assert (result.weights >= 0).all()
        assert torch.isfinite(get_parameter(model, name).grad).all()


def test_plain_step_without_reference_has_nan_scores(setup):
    model, _, name = setup
    model = copy.deepcopy(model)
    step = MimicStep(model, name, "sgd")
    result = step(*_batch())
    assert step.probe is None
    assert torch.isnan(result.scores).all()
    assert torch.allclose(result.weights, torch.full((6,), 1 / 6))


# -- all-layer re-weighting (reweight_all) ---------------------------------------------
def _brute_all_tensors(model, images, texts):
    """``g_i = B * dL/dtheta_i`` of every trainable tensor but the logit scale: each sample runs the
    towers with its own copy of every tensor, so ``dL/dtheta_i`` is exactly its own-path part
    (including its role as a negative for the other samples)."""
    from torch.func import functional_call

    base = dict(model.named_parameters())
    names = [k for k, p in base.items() if p.requires_grad and k != "logit_scale"]
    n = len(images)
    copies = {k: base[k].detach().expand(n, *base[k].shape).clone().requires_grad_(True) for k in names}
    feats = [functional_call(model, {k: copies[k][i] for k in names}, (images[i:i + 1], texts[i:i + 1])) for i in range(n)]
    loss = contrastive_loss(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), model.logit_scale.exp())
    grads = torch.autograd.grad(loss, [copies[k] for k in names])
    return {k: n * g for k, g in zip(names, grads)}


def _weighted_sum(weights, per_sample):
    return (weights.reshape(-1, *[1] * (per_sample.ndim - 1)) * per_sample).sum(0)


def _expected_reweighted(model, reference, name, images, texts, tau):
    """Brute-force scores, weights and ``sum_i w_i g_i`` of every tensor; the plain logit-scale gradient."""
    per_sample = _brute_all_tensors(model, images, texts)
    direction = get_parameter(reference, name).detach() - get_parameter(model, name).detach()
    scores = -(per_sample[name] * direction).sum(dim=(1, 2)) / direction.norm()
    weights = softmax_weights(scores, tau)
    plain = copy.deepcopy(model)
    plain.zero_grad()
    contrastive_loss(*plain(images, texts)[:3]).backward()
    return scores, weights, {k: _weighted_sum(weights, g) for k, g in per_sample.items()}, plain.logit_scale.grad


def _assert_grads(model, expected, scale_grad):
    for k, want in expected.items():
        torch.testing.assert_close(get_parameter(model, k).grad, want, rtol=2e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    torch.testing.assert_close(model.logit_scale.grad, scale_grad, rtol=1e-4, atol=1e-6)


def test_reweight_all_gives_every_tensor_the_reweighted_per_sample_gradient(setup):
    model, reference, name = setup
    model = copy.deepcopy(model)
    images, texts = _batch(n=5, seed=3)
    scores, weights, expected, scale_grad = _expected_reweighted(model, reference, name, images, texts, tau=0.05)
    assert weights.max() > 2 * weights.min()  # far from uniform: the test can tell the difference
    model.zero_grad()
    step = MimicStep(model, name, "grad-mimic", tau=0.05, reference_weight=get_parameter(reference, name).detach(), reweight_all=True)
    result = step(images, texts)
    torch.testing.assert_close(result.scores, scores, rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(result.weights, weights, rtol=2e-4, atol=1e-7)
    assert len(expected) == len([p for p in model.parameters() if p.requires_grad]) - 1  # all but the logit scale
    _assert_grads(model, expected, scale_grad)


def _ddp_worker(rank, world, init_file, model, reference, images, texts, out, initial):
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.train.step import build_mimic_step

    with gloo_group(rank, world, init_file):
        step, name = build_mimic_step(model, MODEL, reference=reference, tau=0.05, reweight_all=True, wrap=DistributedDataParallel,
                                      controls=["zero", "init", "random", "fixed", "aligned"],
                                      baselines=["loss", "ref_loss", "rho", "ref_clipscore"], initial_weight=initial, seed=7,
                                      align_every=1000)
        local = len(images) // world
        mine = slice(rank * local, (rank + 1) * local)
        for i in range(2):  # a second step: DDP's reducer must be ready again after the two-pass backward
            model.zero_grad(set_to_none=True)
            result = step(images[mine], texts[mine])
            if i == 0:
                torch.save({"weights": result.weights, "scores": result.scores, "name": name, "extra": result.extra,
                            "local_extra": result.local_extra,
                            "grads": {k: p.grad for k, p in model.named_parameters()}}, f"{out}/rank{rank}.pt")
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad


def test_reweight_all_under_ddp_with_two_processes(setup, tmp_path):
    """2 gloo processes, DDP: every tensor's gradient is sum_i w_i g_i over the GLOBAL batch on both ranks;
    control and baseline columns equal brute force over the global batch, each rank holding its own rows."""
    import torch.multiprocessing as mp

    from raymimic.mimic import random_matrix

    model, reference, name = setup
    images, texts = _batch(n=12, seed=4)  # 6 rows a rank: 102 image tokens, more than the width, so the aligned fit is determined
    w_0 = get_parameter(_model(3), name).detach().clone()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), copy.deepcopy(model), reference, images, texts, str(tmp_path), w_0),
             nprocs=2)
    scores, weights, expected, scale_grad = _expected_reweighted(copy.deepcopy(model), reference, name, images, texts, tau=0.05)
    per_sample = _brute_mimic(copy.deepcopy(model), name, images, texts)
    w_t, w_ref = get_parameter(model, name).detach(), get_parameter(reference, name).detach()
    r = random_matrix(w_ref.shape, float(w_ref.norm()), seed=7)
    from raymimic.clip.align import align_reference

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same fit, bit for bit
    try:  # the aligned control: rank 0's fit on its own rows, broadcast to every rank
        aligned = align_reference(copy.deepcopy(model), reference, name, images[:6], texts[:6]).weight
    finally:
        torch.set_num_threads(threads)
    columns = {f"score_{c}": _expected_score(per_sample, v, "proj")
               for c, v in {"zero": -w_t, "init": w_0 - w_t, "random": r - w_t, "fixed": w_ref - w_0, "aligned": aligned - w_t}.items()}
    columns.update(_expected_baselines(model, reference, images, texts))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(saved["extra"]) == list(columns)
        for column, want in columns.items():
            torch.testing.assert_close(saved["extra"][column], want, rtol=2e-4, atol=1e-5, msg=lambda m, c=column: f"{c}: {m}")
            torch.testing.assert_close(saved["local_extra"][column], want[rank * 6:(rank + 1) * 6], rtol=2e-4, atol=1e-5)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["name"] == name
        torch.testing.assert_close(saved["scores"], scores, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(saved["weights"], weights, rtol=2e-4, atol=1e-7)
        for k, want in expected.items():
            torch.testing.assert_close(saved["grads"][k], want, rtol=2e-4, atol=1e-6, msg=lambda m, k=k, r=rank: f"rank {r}, {k}: {m}")
        torch.testing.assert_close(saved["grads"]["logit_scale"], scale_grad, rtol=1e-4, atol=1e-6)


# -- controls, direction and baselines ---------------------------------------------------
CONTROLS = ["zero", "init", "random", "fixed"]
BASELINES = ["loss", "ref_loss", "rho", "ref_clipscore"]


def _brute_mimic(model, name, images, texts):
    """``g_i = B * dL/dW_i`` of the mimic layer alone: every sample runs with its own copy of W."""
    from torch.func import functional_call

    weight = get_parameter(model, name).detach()
    copies = weight.expand(len(images), *weight.shape).clone().requires_grad_(True)
    feats = [functional_call(model, {name: copies[i]}, (images[i:i + 1], texts[i:i + 1])) for i in range(len(images))]
    loss = contrastive_loss(torch.cat([f[0] for f in feats]), torch.cat([f[1] for f in feats]), feats[0][2])
    (g,) = torch.autograd.grad(loss, copies)
    return g * len(images)


def _expected_score(per_sample, direction, kind):
    dots = -(per_sample * direction).sum(dim=(1, 2))
    if kind == "proj":
        return dots / direction.norm()
    return dots / (per_sample.flatten(1).norm(dim=1) * direction.norm())


def _expected_baselines(model, reference, images, texts):
    """Per-sample losses of the model and of the reference, and the reference's pair cosines, computed directly."""
    from raymimic.clip.loss import per_sample_contrastive_loss

    with torch.no_grad():
        loss = per_sample_contrastive_loss(*model(images, texts)[:3])
        ref_loss = per_sample_contrastive_loss(*reference(images, texts)[:3])
        image = torch.nn.functional.normalize(reference.encode_image(images), dim=-1)
        text = torch.nn.functional.normalize(reference.encode_text(texts), dim=-1)
    return {"score_loss": -loss, "score_ref_loss": -ref_loss, "score_rho": loss - ref_loss, "score_ref_clipscore": (image * text).sum(-1)}


@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_control_scores_match_brute_force_per_sample_gradients(setup, kind):
    from raymimic.mimic import make_control, random_matrix

    model, reference, name = setup
    model = copy.deepcopy(model)
    images, texts = _batch(n=6, seed=5)
    w_ref = get_parameter(reference, name).detach()
    w_0 = get_parameter(_model(3), name).detach()  # an initial weight other than the current one: init is not degenerate
    w_other = get_parameter(_model(4), name).detach()
    per_sample = _brute_mimic(model, name, images, texts)
    w_t = get_parameter(model, name).detach().clone()
    r = random_matrix(w_ref.shape, float(w_ref.norm()), seed=7)
    assert float(r.norm()) == pytest.approx(float(w_ref.norm()), rel=1e-5)
    assert torch.equal(r, random_matrix(w_ref.shape, float(w_ref.norm()), seed=7))  # seeded: the same on resume
    directions = {"zero": -w_t, "init": w_0 - w_t, "random": r - w_t, "fixed": w_ref - w_0, "other": w_other - w_t}

    model.zero_grad()
    step = MimicStep(model, name, "grad-mimic", tau=0.5, score_kind=kind, reference_weight=w_ref, initial_weight=w_0, seed=7,
                     controls=[*CONTROLS, make_control("other", other=w_other)])
    result = step(images, texts)
    assert list(result.extra) == [f"score_{c}" for c in [*CONTROLS, "other"]] == list(result.local_extra)
    for control, direction in directions.items():
        torch.testing.assert_close(result.extra[f"score_{control}"], _expected_score(per_sample, direction, kind), rtol=2e-4, atol=1e-6,
                                   msg=lambda m, c=control: f"{c}: {m}")
        assert torch.equal(result.local_extra[f"score_{control}"], result.extra[f"score_{control}"])  # one process: local = global
    torch.testing.assert_close(result.scores, _expected_score(per_sample, w_ref - w_t, kind), rtol=2e-4, atol=1e-6)


def test_controls_and_baselines_leave_score_weights_and_gradients_unchanged(setup):
    model, reference, name = setup
    w_ref = get_parameter(reference, name).detach()
    images, texts = _batch(seed=6)
    plain, extended = copy.deepcopy(model), copy.deepcopy(model)
    want = MimicStep(plain, name, "grad-mimic", tau=0.05, reference_weight=w_ref)(images, texts)
    got = MimicStep(extended, name, "grad-mimic", tau=0.05, reference_weight=w_ref, reference_model=reference,
                    controls=["zero", "init", "random", "fixed", "current"], baselines=BASELINES)(images, texts)
    assert torch.equal(got.scores, want.scores) and torch.equal(got.weights, want.weights) and torch.equal(got.loss, want.loss)
    assert not want.extra and len(got.extra) == 9
    for (n, p), (_, q) in zip(plain.named_parameters(), extended.named_parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n
    # the current control is the primary score itself (the same matmul on the same direction)
    torch.testing.assert_close(got.extra["score_current"], got.scores)


def test_direction_fixed_scores_against_the_initial_weight(setup):
    model, reference, name = setup
    model = copy.deepcopy(model)
    w_ref = get_parameter(reference, name).detach()
    w_0 = get_parameter(model, name).detach().clone()
    step = MimicStep(model, name, "grad-mimic", tau=0.5, reference_weight=w_ref, direction="fixed", controls=["current"])
    for seed in (1, 2):  # the second step runs at moved weights: fixed and current now differ
        images, texts = _batch(seed=seed)
        per_sample = _brute_mimic(model, name, images, texts)
        w_t = get_parameter(model, name).detach().clone()
        model.zero_grad()
        result = step(images, texts)
        torch.testing.assert_close(result.scores, _expected_score(per_sample, w_ref - w_0, "proj"), rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(result.extra["score_current"], _expected_score(per_sample, w_ref - w_t, "proj"), rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(result.weights, softmax_weights(result.scores, 0.5))
        with torch.no_grad():
            get_parameter(model, name).sub_(0.5 * get_parameter(model, name).grad)
    assert not torch.allclose(result.scores, result.extra["score_current"])


@pytest.mark.parametrize("control", ["zero", "init", "random", "aligned"])
def test_a_control_can_be_the_primary_direction_of_the_reweighting(setup, control):
    """Grad-Mimic re-weights along the control: score = the control's column = brute force, weights = softmax of it."""
    model, reference, name = setup
    model = copy.deepcopy(model)
    w_ref = get_parameter(reference, name).detach()
    w_0 = get_parameter(_model(2), name).detach()  # another start than the model's, so that init's W_0 - W_t is not 0
    step = MimicStep(model, name, "grad-mimic", tau=0.5, reference_weight=w_ref, reference_model=reference, direction=control,
                     initial_weight=w_0, seed=3, align_every=1)
    assert step.extra_names == [control]
    for seed in (1, 2):  # the second step runs at moved weights
        images, texts = _batch(seed=seed)
        per_sample = _brute_mimic(model, name, images, texts)
        w_t = get_parameter(model, name).detach().clone()
        model.zero_grad()
        result = step(images, texts)
        expected = _expected_score(per_sample, step.controls[control].direction(w_t), "proj")
        torch.testing.assert_close(result.scores, expected, rtol=2e-4, atol=1e-6)
        assert torch.equal(result.scores, result.extra[f"score_{control}"])
        torch.testing.assert_close(result.weights, softmax_weights(result.scores, 0.5))
        torch.testing.assert_close(get_parameter(model, name).grad, torch.einsum("i,ijk->jk", result.weights, per_sample),
                                   rtol=2e-4, atol=1e-6)
        with torch.no_grad():
            get_parameter(model, name).sub_(0.5 * get_parameter(model, name).grad)
    current = _expected_score(per_sample, w_ref - w_t, "proj")
    assert not torch.allclose(result.scores, current, rtol=1e-3, atol=1e-5)  # not the reference's own direction
    with pytest.raises(ValueError, match="not one of"):
        MimicStep(copy.deepcopy(model), name, "grad-mimic", reference_weight=w_ref, direction="sideways")


def test_baselines_match_direct_losses_and_reference_cosines(setup):
    model, reference, name = setup
    model = copy.deepcopy(model)
    images, texts = _batch(seed=8)
    expected = _expected_baselines(model, reference, images, texts)
    step = MimicStep(model, name, "rho", tau=1.0, reference_weight=get_parameter(reference, name).detach(), reference_model=reference,
                     baselines=BASELINES)
    calls = []
    forward = step.reference_model.forward
    step.reference_model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        result = step(images, texts)
    finally:
        del step.reference_model.forward
    assert calls == [1], "rho's weights and the three reference baselines share one reference forward"
    assert list(result.extra) == [f"score_{b}" for b in BASELINES]
    for column, want in expected.items():
        torch.testing.assert_close(result.extra[column], want, rtol=1e-4, atol=1e-5, msg=lambda m, c=column: f"{c}: {m}")
    # RHO-loss's weights are the softmax of its own column
    torch.testing.assert_close(result.weights, softmax_weights(expected["score_rho"], 1.0), rtol=1e-4, atol=1e-6)


def test_plain_step_records_the_loss_baseline_and_zero_control_without_reference(setup):
    model, _, name = setup
    images, texts = _batch(seed=9)
    plain = MimicStep(copy.deepcopy(model), name, "sgd", baselines=["loss"])
    assert plain.probe is None  # the loss needs no probe
    result = plain(images, texts)
    torch.testing.assert_close(result.extra["score_loss"], _expected_baselines(model, model, images, texts)["score_loss"])
    probed = copy.deepcopy(model)
    step = MimicStep(probed, name, "sgd", controls=["zero"])
    assert step.probe is not None  # a control needs the probe, even without a reference
    got = step(images, texts)
    torch.testing.assert_close(got.extra["score_zero"], _expected_score(_brute_mimic(model, name, images, texts),
                                                                         -get_parameter(model, name).detach(), "proj"),
                               rtol=2e-4, atol=1e-6)
    assert torch.isnan(got.scores).all() and torch.allclose(got.weights, torch.full((6,), 1 / 6))
    with pytest.raises(ValueError, match="needs the reference weight"):
        MimicStep(copy.deepcopy(model), name, "sgd", controls=["fixed"])
    with pytest.raises(ValueError, match="reference_model"):
        MimicStep(copy.deepcopy(model), name, "sgd", baselines=["rho"])


def test_init_control_after_checkpoint_round_trip_uses_the_first_attempts_initial_weight(setup, tmp_path):
    """W_0 is saved in the training checkpoint; a resumed step scores init/fixed against it, not the resumed weights."""
    from raymimic.train.checkpoint import TrainState, load_train_checkpoint, save_train_checkpoint
    from raymimic.train.config import TrainConfig
    from raymimic.train.loop import build_optimizer

    model, reference, name = setup
    cfg = TrainConfig(output=str(tmp_path), model=MODEL, reference="R", samples_seen=16, global_batch=8)
    w_ref = get_parameter(reference, name).detach()
    first = copy.deepcopy(model)
    w_0 = get_parameter(first, name).detach().clone()
    optimizer = build_optimizer(first, cfg)
    step = MimicStep(first, name, "grad-mimic", tau=0.5, reference_weight=w_ref, controls=["zero", "init", "fixed"])
    for seed in (1, 2):
        optimizer.zero_grad()
        step(*_batch(seed=seed))
        optimizer.step()
    assert torch.equal(step.initial_weight, w_0)
    save_train_checkpoint(str(tmp_path / "ckpt"), first, MODEL, optimizer, TrainState(step=2), initial_weight=step.initial_weight)

    resumed = _model(11)  # a fresh process: other initial weights until the checkpoint is loaded
    restored = load_train_checkpoint(str(tmp_path / "ckpt"), resumed, build_optimizer(resumed, cfg), "cpu")
    assert restored.state.step == 2 and torch.equal(restored.initial_weight, w_0)
    again = MimicStep(resumed, name, "grad-mimic", tau=0.5, reference_weight=w_ref, controls=["zero", "init", "fixed"],
                      initial_weight=restored.initial_weight)
    images, texts = _batch(seed=3)
    want, got = step(images, texts), again(images, texts)
    for column in ("score_zero", "score_init", "score_fixed"):
        torch.testing.assert_close(got.extra[column], want.extra[column], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(want.extra["score_init"], want.extra["score_zero"])
    # a checkpoint without W_0 (a run without init/fixed) restores None: the loop keeps the recomputed one
    save_train_checkpoint(str(tmp_path / "plain"), first, MODEL, optimizer, TrainState(step=2))
    assert load_train_checkpoint(str(tmp_path / "plain"), resumed, build_optimizer(resumed, cfg), "cpu").initial_weight is None


def test_score_only_scorer_writes_control_columns_and_refuses_init(setup, tmp_path):
    from raymimic.clip import save_checkpoint
    from raymimic.train.score_only import MimicScorer

    model, reference, name = setup
    checkpoint = save_checkpoint(model, str(tmp_path / "model.pt"), MODEL, step=4, epoch=0)
    ref = save_checkpoint(reference, str(tmp_path / "ref.pt"), MODEL)
    with pytest.raises(ValueError, match="degenerate"):
        MimicScorer(MODEL, checkpoint, ref, controls=["init"])
    with pytest.raises(ValueError, match="repeat the primary score"):
        MimicScorer(MODEL, checkpoint, ref, controls=["random", "fixed"])
    scorer = MimicScorer(MODEL, checkpoint, ref, tau=0.5, baselines=["ref_clipscore"])  # default controls: zero (fixed dropped)
    images, texts = _batch(seed=2)
    rows = scorer({"uid": [str(i) for i in range(6)], "image": images.numpy(), "text": texts.numpy()})
    assert {"score_zero", "score_ref_clipscore"} <= set(rows) and "score_fixed" not in rows
    per_sample = _brute_mimic(model, name, images, texts)
    torch.testing.assert_close(torch.as_tensor(rows["score_zero"]), _expected_score(per_sample, -get_parameter(model, name).detach(),
                                                                                   "proj"), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(rows["score_ref_clipscore"]),
                               _expected_baselines(model, reference, images, texts)["score_ref_clipscore"], rtol=1e-4, atol=1e-5)


def test_score_only_backward_reaches_only_the_mimic_layer_and_gives_the_full_backwards_rows(setup, tmp_path):
    from raymimic.clip import save_checkpoint
    from raymimic.train.score_only import MimicScorer

    model, reference, name = setup
    checkpoint = save_checkpoint(model, str(tmp_path / "model.pt"), MODEL)
    ref = save_checkpoint(reference, str(tmp_path / "ref.pt"), MODEL)
    images, texts = _batch(seed=3)
    batch = {"uid": [str(i) for i in range(6)], "image": images.numpy(), "text": texts.numpy()}
    full = MimicScorer(MODEL, checkpoint, ref, controls=["zero", "random"], full_backward=True)
    restricted = MimicScorer(MODEL, checkpoint, ref, controls=["zero", "random"])
    want, got = full(batch), restricted(batch)
    assert set(got) == set(want)
    for column in want:
        np.testing.assert_array_equal(got[column], want[column], err_msg=column)  # the same operations: identical rows
    trainable = [n for n, p in restricted.model.named_parameters() if p.requires_grad]
    assert trainable == [name]
    assert not any(p.requires_grad for p in restricted.model.transformer.parameters())  # no text-tower backward


# -- the options' validation -------------------------------------------------------------
def _train_cfg(**overrides):
    from raymimic.train.config import TrainConfig

    return TrainConfig(**{"output": "/tmp/x", "model": MODEL, "reference": "R", "samples_seen": 16, "global_batch": 8, **overrides})


@pytest.mark.parametrize("overrides, words", [
    ({"controls": ["zero", "nope"]}, ["unknown control 'nope'"]),
    ({"controls": ["Big=ViT-B-32:openai"]}, ["[a-z0-9_]+"]),
    ({"controls": ["zero=ViT-B-32:openai"]}, ["taken"]),
    ({"controls": ["rho=ViT-B-32:openai"]}, ["taken"]),
    ({"controls": ["b16="]}, ["after '='"]),
    ({"controls": ["zero", "init", "zero"]}, ["more than once", "zero"]),
    ({"controls": ["b=X", "b=Y"]}, ["more than once"]),
    ({"controls": ["current"]}, ["repeat the primary score"]),
    ({"controls": ["zero", "fixed"], "direction": "fixed"}, []),  # the default set: fixed is dropped, no error
    ({"controls": ["fixed", "zero"], "direction": "fixed"}, ["repeat the primary score"]),
    ({"direction": "sideways"}, ["direction"]),
    ({"direction": "fixed", "reference": None, "weighting": "sgd"}, ["needs a reference"]),
    ({"direction": "function", "reference": None, "weighting": "sgd"}, ["'function' needs a reference"]),
    ({"controls": ["function"], "reference": None, "weighting": "sgd"}, ["'function' needs a reference"]),
    ({"controls": ["function"], "direction": "function"}, ["repeat the primary score"]),
    ({"controls": ["random"], "reference": None, "weighting": "sgd"}, ["needs a reference"]),
    ({"controls": ["zero", "fixed", "init"], "reference": None, "weighting": "sgd"}, ["'fixed' needs a reference"]),
    ({"baselines": ["loss", "clip"]}, ["unknown baseline 'clip'"]),
    ({"baselines": ["loss", "loss"]}, ["more than once"]),
    ({"baselines": ["ref_clipscore"], "reference": None, "weighting": "sgd"}, ["needs a reference"]),
])
def test_config_refuses_bad_controls_and_baselines(overrides, words):
    if not words:
        assert _train_cfg(**overrides).controls == ["zero"]
        return
    with pytest.raises(ValueError) as info:
        _train_cfg(**overrides)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_config_defaults_adapt_and_survive_the_trip_to_the_workers():
    from raymimic.train.config import ScoreConfig, TrainConfig

    cfg = _train_cfg()
    assert cfg.controls == ["zero", "fixed"] and cfg.baselines == [] and cfg.direction == "current"
    assert _train_cfg(reference=None, weighting="sgd").controls == []  # no reference: no score, the default set is empty
    assert _train_cfg(reference=None, weighting="sgd", controls="zero,init", baselines="loss").controls == ["zero", "init"]
    assert _train_cfg(controls="none").controls == [] and _train_cfg(controls="").controls == []
    fixed = _train_cfg(direction="fixed", controls="zero,init,current,b16=ViT-B-32:openai", baselines="loss,rho")
    assert fixed.controls == ["zero", "init", "current", "b16=ViT-B-32:openai"] and fixed.baselines == ["loss", "rho"]
    assert TrainConfig.from_dict(fixed.to_dict()) == fixed  # workers re-validate the dict: the same config
    assert TrainConfig.from_dict(_train_cfg(direction="fixed").to_dict()).controls == ["zero"]
    score = ScoreConfig(pool="P", model=MODEL, reference="R", output="O")
    assert score.controls == ["zero"] and score.baselines == []
    assert ScoreConfig(pool="P", model=MODEL, reference="R", output="O", controls="zero,random,b=X").controls == ["zero", "random", "b=X"]
    for bad, words in ((["init"], "degenerate"), (["fixed"], "repeat the primary"), (["current"], "repeat the primary")):
        with pytest.raises(ValueError, match=words):
            ScoreConfig(pool="P", model=MODEL, reference="R", output="O", controls=bad)
