"""The probe's scores and re-weighted gradients equal brute-force per-sample gradients.

Brute force: give every sample its own copy of the mimic parameter (torch.func's
functional_call), compute the batch loss, and differentiate with respect to the copies:
``B * dL/dW_i`` is sample i's own-path gradient g_i, including, for CLIP, its role as a
negative for the other samples.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from raymimic.clip import contrastive_loss, create_model, get_tokenizer, resolve_mimic_layer, sample_dim
from raymimic.mimic import (
    GradMimic,
    MimicProbe,
    batch_weights,
    control_directions,
    direction_scores,
    get_parameter,
    grad_norms,
    make_control,
    make_weighting,
    mean_batch_grad,
    mimic_scores,
    output_grads,
    random_matrix,
    reference_direction,
    reweighted_backward,
    reweighted_grad,
    reweighted_loss_backward,
    weighting_stats,
)

torch.manual_seed(0)
ATOL = 1e-5


def close(a, b, rtol=1e-4, atol=ATOL):
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


# -- (a) a small classifier with cross-entropy ------------------------------------------
def _classifier():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))


def _brute_classifier(model, x, y, name):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)[name]


def _classifier_probe(model, x, y):
    """A probe on the head after one ordinary forward/backward of the mean cross-entropy."""
    probe = MimicProbe(model, "2.weight")
    with probe.capture():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return probe


@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_classifier_scores_match_per_sample_gradients(kind):
    model, reference = _classifier(), _classifier()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    name = "2.weight"
    probe = MimicProbe(model, name)
    with probe.capture():
        logits = model(x)
    F.cross_entropy(logits, y).backward()
    per_sample = _brute_classifier(model, x, y, name)  # g_i = grad of l_i = B * own-path of the mean
    v = reference_direction(model, reference, name)
    dots = -(per_sample * v).sum(dim=(1, 2))
    expected = dots / v.norm() if kind == "proj" else dots / (per_sample.flatten(1).norm(dim=1) * v.norm())
    close(mimic_scores(probe, v, global_batch=10, kind=kind), expected)
    close(grad_norms(probe, global_batch=10), per_sample.flatten(1).norm(dim=1))
    close(probe.per_sample_grads() * 10, per_sample)


def test_classifier_reweighted_and_uniform_gradients():
    model = _classifier()
    x, y = torch.randn(7, 6), torch.randint(0, 4, (7,))
    probe = _classifier_probe(model, x, y)
    per_sample = _brute_classifier(model, x, y, "2.weight")
    w = torch.softmax(torch.randn(7), 0)
    close(reweighted_grad(probe, w, global_batch=7), (w[:, None, None] * per_sample).sum(0))
    uniform = make_weighting("sgd").weights({"batch_size": torch.tensor(7)})
    close(reweighted_grad(probe, uniform, global_batch=7), model[2].weight.grad, atol=1e-6)
    close(mean_batch_grad(probe), model[2].weight.grad, atol=1e-6)


def test_classifier_all_layers_reweighting_matches_weighted_loss():
    model = _classifier()
    x, y = torch.randn(9, 6), torch.randint(0, 4, (9,))
    w = torch.softmax(torch.randn(9), 0)
    logits = model(x)
    grads = output_grads(F.cross_entropy(logits, y), [logits])
    assert all(p.grad is None for p in model.parameters())  # the first pass accumulates nothing
    reweighted_backward([logits], grads, w, global_batch=9)
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    (w * F.cross_entropy(model(x), y, reduction="none")).sum().backward()
    for k, p in model.named_parameters():
        close(got[k], p.grad)
    # independent per-sample losses: the same through the weighted-loss backward, for every tensor
    per_sample = {k: _brute_classifier(model, x, y, k) for k, _ in model.named_parameters()}
    model.zero_grad()
    reweighted_loss_backward(F.cross_entropy(model(x), y, reduction="none"), w)
    for k, p in model.named_parameters():
        close(p.grad, (w.reshape(-1, *[1] * (p.ndim)) * per_sample[k]).sum(0))


@pytest.mark.parametrize("method", ["grad-mimic", "grad-norm", "agra", "rho", "grad-match", "sgd"])
def test_weighting_stats_match_per_sample_gradients(method):
    """One place computes what each weighting needs; every statistic against brute force."""
    model, reference = _classifier(), _classifier()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    probe = _classifier_probe(model, x, y)
    g = _brute_classifier(model, x, y, "2.weight")
    v = reference_direction(model, reference, "2.weight")
    other = torch.randn(4, 8)
    called = []
    weighting = make_weighting(method)
    stats, mean_grad = weighting_stats(weighting, probe, v, 8, losses=torch.arange(8.0),
                                       ref_losses=lambda: called.append(1) or torch.ones(8), align_with=other)
    close(stats["mimic"], -(g * v).sum(dim=(1, 2)) / v.norm())
    assert set(stats) == {"mimic", "batch_size", *weighting.needs} and int(stats["batch_size"]) == 8
    assert called == ([1] if "ref_loss" in weighting.needs else [])  # computed only when needed
    if "grad_norm" in weighting.needs:
        close(stats["grad_norm"], g.flatten(1).norm(dim=1))
    if "align" in weighting.needs:
        close(stats["align"], F.cosine_similarity(g.flatten(1), other.flatten()[None], dim=1))
        close(mean_grad, g.mean(0))  # the next step's comparison
    else:
        assert mean_grad is None
    if "gram" in weighting.needs:
        close(stats["gram"], g.flatten(1) @ g.flatten(1).t(), rtol=1e-4, atol=1e-4)
    weights, local = batch_weights(weighting, stats)
    assert torch.equal(weights, local) and weights.shape == (8,) and float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
    # a worker holding samples 4-7 of a global batch of 16 gets its slice (Grad-Match: its local share of 1)
    stats["batch_size"] = torch.tensor(16)
    if "gram" in weighting.needs:  # the scores come gathered from both workers (the global batch's size)
        _, local = batch_weights(weighting, stats | {"mimic": torch.cat([stats["mimic"], stats["mimic"]])}, rank=1, local=8)
        assert float(local.sum()) == pytest.approx(0.5, abs=1e-5)
    elif method != "sgd":
        full = torch.cat([stats["mimic"], stats["mimic"]])  # as if gathered from two workers
        doubled = {k: torch.cat([t, t]) if t.ndim == 1 and k != "batch_size" else t for k, t in stats.items()} | {"mimic": full}
        weights, local = batch_weights(weighting, doubled, rank=1, local=8)
        assert torch.equal(local, weights[8:])


def test_first_agra_step_agrees_with_all_and_distribution_comes_in_as_callables():
    model = _classifier()
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    probe = _classifier_probe(model, x, y)
    calls = []

    def gather(t):
        calls.append("gather")
        return t

    def all_reduce(t):
        calls.append("all_reduce")
        return t

    stats, mean_grad = weighting_stats(make_weighting("agra"), probe, None, 6, gather=gather, all_reduce=all_reduce)
    assert torch.isnan(stats["mimic"]).all() and torch.equal(stats["align"], torch.ones(6))
    assert calls == ["gather", "all_reduce"] and mean_grad is not None


# -- (b) a tiny open_clip CLIP with the contrastive loss --------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(2)
    model, _, _ = create_model("raymimic-tiny")
    reference, _, _ = create_model("raymimic-tiny")
    tokenizer = get_tokenizer("raymimic-tiny")
    images = torch.randn(6, 3, 32, 32)
    texts = tokenizer(["a red circle", "a blue square on the left", "two green stars", "a photo", "a small dog", "text"])
    return model.train(), reference, images, texts


def _clip_loss(model, images, texts, params=None):
    out = functional_call(model, params, (images, texts)) if params else model(images, texts)
    return contrastive_loss(*out[:3])


def _brute_clip(model, images, texts, name):
    """B * dL/dW_i with a separate copy W_i of the parameter for every sample."""
    weight = get_parameter(model, name).detach()
    copies = weight.expand(len(images), *weight.shape).clone().requires_grad_(True)
    feats = [functional_call(model, {name: copies[i]}, (images[i : i + 1], texts[i : i + 1])) for i in range(len(images))]
    image_f = torch.cat([f[0] for f in feats])
    text_f = torch.cat([f[1] for f in feats])
    loss = contrastive_loss(image_f, text_f, feats[0][2])
    (g,) = torch.autograd.grad(loss, copies)
    return g * len(images)


@pytest.mark.parametrize("layer", ["image-mlp", "text-mlp", "image-proj", "text-proj"])
@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_clip_scores_match_per_sample_gradients(tiny_clip, layer, kind):
    model, reference, images, texts = tiny_clip
    model.zero_grad()
    name = resolve_mimic_layer(model, layer)
    probe = MimicProbe(model, name, batch_dim=sample_dim(model, name))
    with probe.capture():
        loss = _clip_loss(model, images, texts)
    loss.backward()
    per_sample = _brute_clip(model, images, texts, name)
    # own-path contributions add up to the ordinary batch gradient
    close(per_sample.mean(0), get_parameter(model, name).grad)
    v = reference_direction(model, reference, name)
    dots = -(per_sample * v).sum(dim=tuple(range(1, per_sample.ndim)))
    norms = per_sample.flatten(1).norm(dim=1)
    expected = dots / v.norm() if kind == "proj" else dots / (norms * v.norm())
    close(mimic_scores(probe, v, global_batch=6, kind=kind), expected, rtol=2e-4)
    close(grad_norms(probe, global_batch=6), norms, rtol=2e-4)
    w = GradMimic(tau=0.5).weights({"mimic": expected})
    close(reweighted_grad(probe, w, global_batch=6), (w.reshape(-1, 1, 1) * per_sample).sum(0), rtol=2e-4)
    uniform = torch.full((6,), 1 / 6)
    close(reweighted_grad(probe, uniform, global_batch=6), get_parameter(model, name).grad, rtol=2e-4)


def test_clip_all_layers_reweighting_matches_per_sample_copies(tiny_clip):
    model, _, images, texts = tiny_clip
    model.zero_grad()
    image_f, text_f, scale = model(images, texts)
    contrastive_loss(image_f, text_f, scale).backward(retain_graph=True)
    plain_scale_grad = model.logit_scale.grad.clone()
    model.zero_grad(set_to_none=True)
    grads = output_grads(contrastive_loss(image_f, text_f, scale), [image_f, text_f, scale])
    w = torch.softmax(torch.randn(6), 0)
    reweighted_backward([image_f, text_f], grads[:2], w, global_batch=6, shared=[(scale, grads[2])])
    for name in ["visual.transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.1.mlp.c_proj.weight", "visual.proj"]:
        per_sample = _brute_clip(model, images, texts, name)
        close(get_parameter(model, name).grad, (w.reshape(-1, *[1] * (per_sample.ndim - 1)) * per_sample).sum(0), rtol=2e-4)
    close(model.logit_scale.grad, plain_scale_grad)


def test_probe_errors_are_clear(tiny_clip):
    model, reference, images, texts = tiny_clip
    with pytest.raises(KeyError, match="closest names"):
        MimicProbe(model, "visual.transformer.resblocks.1.mlp.c_proj.weigth")
    with pytest.raises(ValueError, match="2-D"):
        MimicProbe(model, "visual.ln_post.weight")
    probe = MimicProbe(model, "visual.proj")
    with pytest.raises(RuntimeError, match="not used in the forward"):
        with probe.capture():
            model.encode_text(texts)
    other, _, _ = create_model("raymimic-small")
    with pytest.raises(ValueError, match="model shape .* vs reference shape"):
        reference_direction(model, other, "visual.proj")


def test_approximate_influence_direction_from_clean_samples():
    from raymimic.mimic import clean_gradient_direction

    model = _classifier()
    clean_x, clean_y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    v = clean_gradient_direction(_classifier_probe(model, clean_x, clean_y))
    clean_mean = _brute_classifier(model, clean_x, clean_y, "2.weight").mean(0)
    close(v, -clean_mean)
    model.zero_grad()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    probe = _classifier_probe(model, x, y)
    per_sample = _brute_classifier(model, x, y, "2.weight")
    expected = (per_sample * clean_mean).sum(dim=(1, 2)) / clean_mean.norm()
    close(mimic_scores(probe, v, global_batch=8), expected)


@pytest.mark.parametrize("layer", ["image-mlp", "text-proj"])
@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_control_directions_and_scores_match_per_sample_gradients(tiny_clip, layer, kind):
    """Every control's score is <-g_i, V_c>/||V_c|| (or the cosine) of brute-force per-sample gradients, from one probe."""
    model, reference, images, texts = tiny_clip
    model.zero_grad()
    name = resolve_mimic_layer(model, layer)
    probe = MimicProbe(model, name, batch_dim=sample_dim(model, name))
    with probe.capture():
        loss = _clip_loss(model, images, texts)
    loss.backward()
    per_sample = _brute_clip(model, images, texts, name)
    w_t, w_ref = get_parameter(model, name).detach(), get_parameter(reference, name).detach()
    w_0, w_other = w_t + 0.1 * torch.randn_like(w_t), torch.randn_like(w_t)
    controls = {c: make_control(c, reference=w_ref, initial=w_0, seed=3) for c in ("zero", "init", "random", "fixed", "current")}
    controls["other"] = make_control("other", other=w_other)
    r = random_matrix(w_ref.shape, float(w_ref.norm()), 3)
    expected_v = {"zero": -w_t, "init": w_0 - w_t, "random": r - w_t, "fixed": w_ref - w_0, "current": w_ref - w_t,
                  "other": w_other - w_t}
    directions = control_directions(controls, get_parameter(model, name))
    got = direction_scores(probe, directions, global_batch=6, kind=kind)
    assert list(got) == list(expected_v)
    norms = per_sample.flatten(1).norm(dim=1)
    for c, v in expected_v.items():
        close(directions[c], v)
        dots = -(per_sample * v).sum(dim=tuple(range(1, per_sample.ndim)))
        close(got[c], dots / v.norm() if kind == "proj" else dots / (norms * v.norm()), rtol=2e-4)
        assert torch.equal(got[c], mimic_scores(probe, directions[c], global_batch=6, kind=kind))  # the same numbers as the score
    assert direction_scores(probe, {}, 6) == {}
    with pytest.raises(ValueError, match="needs"):
        make_control("fixed", reference=w_ref)
