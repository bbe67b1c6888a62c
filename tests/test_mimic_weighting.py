import numpy as np
import pytest
import torch

from raymimic.mimic import AGRA, GradMatch, GradMimic, GraNd, RHOLoss, make_weighting, softmax_weights


def test_softmax_weights_sum_to_one_and_temperature_sharpens():
    m = torch.tensor([0.0, 1.0, 2.0])
    soft, sharp = softmax_weights(m, 1.0), softmax_weights(m, 0.1)
    assert soft.sum().item() == pytest.approx(1.0)
    assert sharp[2] > soft[2] > 1 / 3
    with pytest.raises(ValueError, match="tau"):
        softmax_weights(m, 0.0)


def test_grad_mimic_raw_scores_without_normalisation():
    m = torch.tensor([0.5, -1.0])
    assert torch.equal(GradMimic(normalize=False).weights({"mimic": m}), m)


def test_grand_prefers_large_gradients():
    w = GraNd().weights({"grad_norm": torch.tensor([1.0, 2.0, 10.0])})
    assert w.argmax() == 2 and w.sum().item() == pytest.approx(1.0)


def test_agra_equal_weight_for_agreeing_samples_and_fallback():
    w = AGRA().weights({"align": torch.tensor([0.3, -0.2, 0.9, 0.0])})
    assert w.tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert AGRA().weights({"align": torch.tensor([-1.0, -0.5])}).tolist() == pytest.approx([0.5, 0.5])


def test_rho_weights_reducible_loss():
    w = RHOLoss(tau=1.0).weights({"loss": torch.tensor([2.0, 2.0]), "ref_loss": torch.tensor([0.1, 1.9])})
    assert w[0] > w[1]


def test_grad_match_matches_the_batch_mean_with_a_sparse_nonnegative_subset():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(16, 40)) + 1.0
    gram = torch.as_tensor(grads @ grads.T)
    w = GradMatch(budget=0.5).weights({"gram": gram}).numpy()
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0) and (w > 0).sum() <= 8
    target = grads.mean(0)
    matched = np.linalg.norm(w @ grads - target)
    random_subset = np.linalg.norm(grads[:8].mean(0) - target)
    assert matched < random_subset
    full = GradMatch(budget=1.0).weights({"gram": gram}).numpy()
    assert np.linalg.norm(full @ grads - target) < 0.05 * np.linalg.norm(target)


def test_make_weighting_by_name_and_unknown_name():
    assert isinstance(make_weighting("grad-mimic", tau=0.05), GradMimic)
    assert make_weighting("grad-mimic", tau=0.05).tau == 0.05
    assert make_weighting("sgd", tau=0.05).name == "sgd"
    with pytest.raises(ValueError, match="choose one of"):
        make_weighting("gradmimic")
