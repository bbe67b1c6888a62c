"""Reference alignment: exact recovery of known permutations and rotations, on matrices and on open_clip models."""
from __future__ import annotations

import pytest
import torch

from raymimic.mimic.align import align_weight, fit_quality, map_weight, match_units, procrustes


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def test_procrustes_recovers_a_rotation():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    q = _orthogonal(8, 1)
    found = procrustes(x, x @ q)
    assert torch.allclose(found, q, atol=1e-5)
    assert fit_quality(x, x @ q, found) == pytest.approx(1.0, abs=1e-6)


def test_match_units_recovers_a_permutation_under_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g)
    perm = torch.randperm(12, generator=g)
    target = x[:, perm] + 0.1 * torch.randn(500, 12, generator=g)
    matrix = match_units(x, target)
    # source unit perm[j] is target unit j
    assert torch.equal(matrix.argmax(1)[perm], torch.arange(12))
    assert torch.equal(matrix.sum(0), torch.ones(12)) and torch.equal(matrix.sum(1), torch.ones(12))


@pytest.mark.parametrize("bare", [False, True])
def test_aligned_weight_is_the_targets_when_the_bases_differ_by_known_maps(bare):
    g = torch.Generator().manual_seed(3)
    d_in, d_out, n = 6, 4, 300
    w_ref = torch.randn(d_in, d_out, generator=g) if bare else torch.randn(d_out, d_in, generator=g)
    m_in, m_out = _orthogonal(d_in, 4), _orthogonal(d_out, 5)
    x_ref = torch.randn(n, d_in, generator=g)
    y_ref = x_ref @ w_ref if bare else x_ref @ w_ref.t()
    w_target = map_weight(w_ref, m_in, m_out, bare)  # the same function written in the target's basis
    x_target = x_ref @ m_in
    y_target = x_target @ w_target if bare else x_target @ w_target.t()
    assert torch.allclose(y_target, y_ref @ m_out, atol=1e-4)  # sanity: the maps relate the two layers' activations
    alignment = align_weight(w_ref, w_target, {"ref_in": x_ref, "target_in": x_target, "ref_out": y_ref, "target_out": y_target},
                             bare=bare)
    assert torch.allclose(alignment.weight, w_target, atol=1e-4)
    assert alignment.cosine_after == pytest.approx(1.0, abs=1e-5)
    assert alignment.in_fit == pytest.approx(1.0, abs=1e-5) and alignment.out_fit == pytest.approx(1.0, abs=1e-5)


def test_align_weight_names_missing_activations():
    with pytest.raises(ValueError, match="ref_out"):
        align_weight(torch.zeros(2, 2), torch.zeros(2, 2), {"ref_in": torch.zeros(3, 2), "target_in": torch.zeros(3, 2)}, bare=False)


def _batch(model_name: str, n: int = 128):  # more samples than features: every map is determined
    from raymimic.clip import create_model

    torch.manual_seed(0)
    model = create_model(model_name)[0].eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = torch.randint(1, 400, (n, model.context_length), generator=g)
    return model, images, texts


def _permute_hidden_units(model, name: str, seed: int) -> None:
    """Renumber the hidden units of the MLP holding ``name`` (c_fc rows, its bias, c_proj columns): the same function."""
    mlp = model.get_submodule(name.rsplit(".", 2)[0])
    perm = torch.randperm(mlp.c_fc.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mlp.c_fc.weight.copy_(mlp.c_fc.weight[perm])
        mlp.c_fc.bias.copy_(mlp.c_fc.bias[perm])
        mlp.c_proj.weight.copy_(mlp.c_proj.weight[:, perm])


def test_align_reference_undoes_a_permutation_of_mlp_hidden_units():
    """A copy of the model with the last image MLP's hidden units permuted computes the same function;
    alignment must map the copy's c_proj weight back onto the model's."""
    import copy

    from raymimic.clip import resolve_mimic_layer
    from raymimic.clip.align import align_reference

    target, images, texts = _batch("raymimic-tiny")
    name = resolve_mimic_layer(target, "image-mlp")
    reference = copy.deepcopy(target)
    _permute_hidden_units(reference, name, seed=2)
    with torch.no_grad():  # the permuted copy is the same function
        assert torch.allclose(reference.encode_image(images), target.encode_image(images), atol=1e-5)
    alignment = align_reference(target, reference, name, images, texts)
    assert alignment.cosine_before < 0.5
    assert torch.allclose(alignment.weight, target.get_parameter(name), atol=1e-4)
    assert alignment.in_fit == pytest.approx(1.0, abs=1e-4)


def test_align_reference_undoes_a_rotation_of_the_joint_space():
    import copy

    from raymimic.clip.align import align_reference

    target, images, texts = _batch("raymimic-tiny")
    reference = copy.deepcopy(target)
    q = _orthogonal(target.visual.proj.shape[1], 7)
    with torch.no_grad():  # rotating both towers' projections leaves every image-text cosine unchanged
        reference.visual.proj.copy_(reference.visual.proj @ q)
        reference.text_projection.copy_(reference.text_projection @ q)
    alignment = align_reference(target, reference, "visual.proj", images, texts)
    assert torch.allclose(alignment.weight, target.visual.proj, atol=1e-4)
    assert alignment.cosine_after == pytest.approx(1.0, abs=1e-5)


def test_the_aligned_control_ignores_how_the_reference_numbers_its_hidden_units():
    """Scores against the aligned reference are the same for a reference and a copy with permuted MLP hidden units,
    while the unaligned score changes: alignment removes exactly the basis the two inits do not share."""
    import copy

    from raymimic.clip import create_model, resolve_mimic_layer
    from raymimic.train.step import build_mimic_step

    target, images, texts = _batch("raymimic-tiny", n=64)
    torch.manual_seed(5)
    reference = create_model("raymimic-tiny")[0]
    name = resolve_mimic_layer(target, "image-mlp")
    permuted = copy.deepcopy(reference)
    _permute_hidden_units(permuted, name, seed=6)
    results = {}
    for label, ref in (("original", reference), ("permuted", permuted)):
        step, _ = build_mimic_step(copy.deepcopy(target), "raymimic-tiny", reference=ref, weighting="sgd", controls=["zero", "aligned"],
                                   align_every=2)
        assert step.extra_names == ["zero", "aligned"]
        results[label] = [step(images[:32], texts[:32]), step(images[32:], texts[32:])]
        assert step.alignment is not None and step._calls == 2
    for first, second in zip(results["original"], results["permuted"]):
        assert torch.allclose(first.extra["score_aligned"], second.extra["score_aligned"], atol=1e-4)
        assert torch.allclose(first.extra["score_zero"], second.extra["score_zero"], atol=1e-5)
    assert not torch.allclose(results["original"][0].scores, results["permuted"][0].scores, atol=1e-3)


def test_the_aligned_control_needs_the_reference():
    from raymimic.train.config import resolve_controls

    with pytest.raises(ValueError, match="needs a reference"):
        resolve_controls(["aligned"], reference=False)
    assert resolve_controls(["zero", "aligned"], reference=True) == ["zero", "aligned"]
