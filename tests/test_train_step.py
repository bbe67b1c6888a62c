"""One Stage-1 step in a single process: gradients, scores and weights against direct computations."""
from __future__ import annotations

import copy

import pytest
import torch

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


def _ddp_worker(rank, world, init_file, model, reference, images, texts, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.train.step import build_mimic_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        step, name = build_mimic_step(model, MODEL, reference=reference, tau=0.05, reweight_all=True, wrap=DistributedDataParallel)
        local = len(images) // world
        mine = slice(rank * local, (rank + 1) * local)
        for i in range(2):  # a second step: DDP's reducer must be ready again after the two-pass backward
            model.zero_grad(set_to_none=True)
            result = step(images[mine], texts[mine])
            if i == 0:
                torch.save({"weights": result.weights, "scores": result.scores, "name": name,
                            "grads": {k: p.grad for k, p in model.named_parameters()}}, f"{out}/rank{rank}.pt")
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad
    finally:
        dist.destroy_process_group()


def test_reweight_all_under_ddp_with_two_processes(setup, tmp_path):
    """2 gloo processes, DDP: every tensor's gradient is sum_i w_i g_i over the GLOBAL batch on both ranks."""
    import torch.multiprocessing as mp

    model, reference, name = setup
    images, texts = _batch(n=6, seed=4)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), copy.deepcopy(model), reference, images, texts, str(tmp_path)), nprocs=2)
    scores, weights, expected, scale_grad = _expected_reweighted(copy.deepcopy(model), reference, name, images, texts, tau=0.05)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["name"] == name
        torch.testing.assert_close(saved["scores"], scores, rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(saved["weights"], weights, rtol=2e-4, atol=1e-7)
        for k, want in expected.items():
            torch.testing.assert_close(saved["grads"][k], want, rtol=2e-4, atol=1e-6, msg=lambda m, k=k, r=rank: f"rank {r}, {k}: {m}")
        torch.testing.assert_close(saved["grads"]["logit_scale"], scale_grad, rtol=1e-4, atol=1e-6)
