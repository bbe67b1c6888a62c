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
    # every other tensor keeps the plain batch gradient
    other = "visual.proj"
    assert get_parameter(model, other).grad is not None


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
