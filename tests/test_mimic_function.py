"""The function-space direction V_fn = -dD/dW against brute force: D written out and differentiated with
torch.func, per-sample gradients from torch.func, in one process and under 2-process DDP (gloo)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import gloo_group
from torch.func import functional_call, grad, vmap

from raymimic.clip import contrastive_loss, create_model, resolve_mimic_layer, sample_dim
from raymimic.mimic import MimicProbe, distillation_losses, function_direction, get_parameter, mimic_scores, softmax_weights
from raymimic.train.step import MimicStep

MODEL = "raymimic-tiny"
LAYERS = ["image-mlp", "text-mlp", "image-proj"]


def _model(seed: int):
    torch.manual_seed(seed)
    return create_model(MODEL)[0]


def _batch(n: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(1, 400, (n, 16), generator=generator)


@pytest.fixture(scope="module")
def models():
    return _model(0).train(), _model(1).eval().requires_grad_(False)


def _written_out_rows(target, reference) -> torch.Tensor:
    """d_i written out on the full similarity matrices: text -> image rows are the transposed image -> text matrix."""
    image, text, scale = target
    ref_image, ref_text, ref_scale = reference
    logits, ref_logits = scale * image @ text.t(), ref_scale * ref_image @ ref_text.t()
    rows = []
    for t, r in ((logits, ref_logits), (logits.t(), ref_logits.t())):
        rows.append(F.kl_div(F.log_softmax(t, dim=-1), F.log_softmax(r, dim=-1), reduction="none", log_target=True).sum(-1))
    return 0.5 * (rows[0] + rows[1])


def _explicit_direction(model, reference, name, images, texts) -> torch.Tensor:
    """-dD/dW by torch.func.grad of D as a function of the layer's weight alone."""
    with torch.no_grad():
        ref_out = reference(images, texts)[:3]

    def d_of(weight):
        return _written_out_rows(functional_call(model, {name: weight}, (images, texts))[:3], ref_out).mean()

    return -grad(d_of)(get_parameter(model, name).detach()).detach()


def _per_sample(model, name, images, texts) -> torch.Tensor:
    """g_i = B * dL/dW_i with torch.func: every sample runs through its own copy of the layer (vmap)."""
    weight = get_parameter(model, name).detach()
    scale = model.logit_scale.exp().detach()

    def features(w, image, text):
        out = functional_call(model, {name: w}, (image[None], text[None]))
        return out[0][0], out[1][0]

    def batch_loss(copies):
        image_f, text_f = vmap(features)(copies, images, texts)
        return contrastive_loss(image_f, text_f, scale)

    return grad(batch_loss)(weight.expand(len(images), *weight.shape).contiguous()) * len(images)


def _expected_scores(per_sample, direction, kind="proj"):
    dots = -(per_sample * direction).flatten(1).sum(1)
    return dots / direction.norm() if kind == "proj" else dots / (per_sample.flatten(1).norm(dim=1) * direction.norm())


def test_distillation_losses_match_the_written_out_kl_and_vanish_for_the_reference_itself(models):
    model, reference = models
    images, texts = _batch()
    with torch.no_grad():
        out, ref_out = model(images, texts)[:3], reference(images, texts)[:3]
        losses = distillation_losses(out, ref_out)
        torch.testing.assert_close(losses, _written_out_rows(out, ref_out), rtol=1e-5, atol=1e-6)
        assert (losses > 1e-3).all()  # two different models: the test can tell a wrong row from a right one
        torch.testing.assert_close(distillation_losses(ref_out, ref_out), torch.zeros(6), rtol=0, atol=1e-6)
    same = copy.deepcopy(reference).requires_grad_(True)
    name = resolve_mimic_layer(same, "image-mlp")
    v = function_direction(distillation_losses(same(images, texts)[:3], ref_out), get_parameter(same, name))
    assert float(v.abs().max()) < 1e-6  # the reference already behaves like itself: nowhere to move


@pytest.mark.parametrize("layer", LAYERS)
def test_function_direction_is_minus_the_explicit_gradient_of_d_and_touches_no_grad(models, layer):
    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch()
    name = resolve_mimic_layer(model, layer)
    with torch.no_grad():
        ref_out = reference(images, texts)[:3]
    v = function_direction(distillation_losses(model(images, texts)[:3], ref_out), get_parameter(model, name))
    expected = _explicit_direction(model, reference, name, images, texts)
    assert float(expected.norm()) > 1e-4
    torch.testing.assert_close(v, expected, rtol=2e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_function_scores_match_torch_func_per_sample_gradients(models, layer, kind):
    """The direction's backward runs first; the probe then holds the batch loss's output gradient, not D's."""
    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch()
    name = resolve_mimic_layer(model, layer)
    probe = MimicProbe(model, name, batch_dim=sample_dim(model, name))
    with torch.no_grad():
        ref_out = reference(images, texts)[:3]
    with probe.capture():
        out = model(images, texts)[:3]
        loss = contrastive_loss(*out)
    v = function_direction(distillation_losses(out, ref_out), get_parameter(model, name))
    loss.backward()
    per_sample = _per_sample(model, name, images, texts)
    torch.testing.assert_close(per_sample.mean(0), get_parameter(model, name).grad, rtol=2e-4, atol=1e-6)
    expected = _expected_scores(per_sample, _explicit_direction(model, reference, name, images, texts), kind)
    torch.testing.assert_close(mimic_scores(probe, v, global_batch=6, kind=kind), expected, rtol=5e-4, atol=1e-6)


@pytest.mark.parametrize("reweight_all", [False, True])
def test_step_with_the_function_direction_scores_and_reweights_exactly(models, reweight_all):
    """direction='function': the score, the score_function column and Grad-Mimic's re-weighted mimic gradient."""
    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch(seed=5)
    name = resolve_mimic_layer(model, "image-mlp")
    w_t = get_parameter(model, name).detach().clone()
    v = _explicit_direction(model, reference, name, images, texts)
    per_sample = _per_sample(model, name, images, texts)
    scores = _expected_scores(per_sample, v)
    weights = softmax_weights(scores, 0.05)
    assert weights.max() > 2 * weights.min()  # far from uniform
    step = MimicStep(model, name, "grad-mimic", tau=0.05, reference_weight=get_parameter(reference, name).detach(),
                     reference_model=reference, reweight_all=reweight_all, direction="function", controls=["zero", "function"],
                     baselines=["ref_clipscore"])
    assert step.extra_names == ["zero", "function", "ref_clipscore"]
    result = step(images, texts)
    torch.testing.assert_close(result.scores, scores, rtol=5e-4, atol=1e-6)
    torch.testing.assert_close(result.weights, weights, rtol=2e-3, atol=1e-6)
    assert list(result.extra) == ["score_zero", "score_function", "score_ref_clipscore"]
    torch.testing.assert_close(result.extra["score_function"], result.scores)
    torch.testing.assert_close(result.extra["score_zero"], _expected_scores(per_sample, -w_t), rtol=5e-4, atol=1e-6)
    torch.testing.assert_close(get_parameter(model, name).grad, (result.weights.reshape(-1, 1, 1) * per_sample).sum(0),
                               rtol=5e-4, atol=1e-6)


def test_function_control_beside_the_weight_direction_leaves_score_and_gradient_unchanged(models):
    model, reference = models
    images, texts = _batch(seed=6)
    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(reference, name).detach()
    results = {}
    for controls in ((), ("function",)):
        copy_ = copy.deepcopy(model)
        step = MimicStep(copy_, name, "grad-mimic", tau=0.05, reference_weight=w_ref, reference_model=reference, controls=controls)
        results[controls] = (step(images, texts), get_parameter(copy_, name).grad.clone())
    (plain, plain_grad), (with_fn, fn_grad) = results[()], results[("function",)]
    torch.testing.assert_close(with_fn.scores, plain.scores)
    torch.testing.assert_close(fn_grad, plain_grad)
    per_sample = _per_sample(model, name, images, texts)
    expected = _expected_scores(per_sample, _explicit_direction(model, reference, name, images, texts))
    torch.testing.assert_close(with_fn.extra["score_function"], expected, rtol=5e-4, atol=1e-6)


def test_function_direction_needs_the_reference_model(models):
    model, reference = models
    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(reference, name).detach()
    for kwargs in ({"direction": "function"}, {"controls": ["function"]}):
        with pytest.raises(ValueError, match="needs the reference model"):
            MimicStep(model, name, "sgd", reference_weight=w_ref, **kwargs)


def _ddp_worker(rank, world, init_file, model, reference, images, texts, out):
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.clip.loss import gather_with_grad, grad_scale
    from raymimic.train.step import all_reduce_sum, build_mimic_step

    with gloo_group(rank, world, init_file):
        local = len(images) // world
        mine = slice(rank * local, (rank + 1) * local)
        # the maths module on its own: local rows against the gathered batch, all-reduced
        bare = copy.deepcopy(model)
        name = resolve_mimic_layer(bare, "image-mlp")
        with torch.no_grad():
            ref_out = reference(images[mine], texts[mine])[:3]
        losses = distillation_losses(bare(images[mine], texts[mine])[:3], ref_out, gather=gather_with_grad)
        direction = function_direction(losses, get_parameter(bare, name), grad_scale(), all_reduce_sum)
        # the whole step, DDP-wrapped
        step, _ = build_mimic_step(model, MODEL, reference=reference, tau=0.05, wrap=DistributedDataParallel, direction="function",
                                   controls=["zero"])
        model.zero_grad(set_to_none=True)
        result = step(images[mine], texts[mine])
        torch.save({"direction": direction, "scores": result.scores, "weights": result.weights, "extra": result.extra,
                    "grad": get_parameter(model, name).grad}, f"{out}/rank{rank}.pt")


def test_function_direction_and_step_under_ddp_with_two_processes(models, tmp_path):
    """2 gloo processes: the all-reduced V_fn, the scores and the re-weighted mimic gradient equal the single-process global batch's."""
    import torch.multiprocessing as mp

    model, reference = models
    images, texts = _batch(n=8, seed=4)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), copy.deepcopy(model), reference, images, texts, str(tmp_path)), nprocs=2)
    name = resolve_mimic_layer(model, "image-mlp")
    v = _explicit_direction(copy.deepcopy(model), reference, name, images, texts)
    per_sample = _per_sample(copy.deepcopy(model), name, images, texts)
    scores = _expected_scores(per_sample, v)
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(saved["direction"], v, rtol=2e-4, atol=1e-6, msg=lambda m, r=rank: f"rank {r}: {m}")
        torch.testing.assert_close(saved["scores"], scores, rtol=5e-4, atol=1e-6)
        torch.testing.assert_close(saved["extra"]["score_zero"], _expected_scores(per_sample, -get_parameter(model, name).detach()),
                                   rtol=5e-4, atol=1e-6)
        torch.testing.assert_close(saved["grad"], (saved["weights"].reshape(-1, 1, 1) * per_sample).sum(0), rtol=5e-4, atol=1e-6)
        torch.testing.assert_close(saved["weights"], softmax_weights(scores, 0.05), rtol=2e-3, atol=1e-6)


def test_both_towers_scored_together_from_one_backward(models):
    """image-mlp and text-mlp: one backward of D gives both V_fn, one batch backward both probes; the joint score is the
    score of the two layers' per-sample gradients side by side against the two directions side by side."""
    from raymimic.mimic import function_directions, joint_mimic_scores

    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch(seed=7)
    names = [resolve_mimic_layer(model, layer) for layer in ("image-mlp", "text-mlp")]
    probes = [MimicProbe(model, name, batch_dim=sample_dim(model, name)) for name in names]
    with torch.no_grad():
        ref_out = reference(images, texts)[:3]
    with probes[0].capture(), probes[1].capture():
        out = model(images, texts)[:3]
        loss = contrastive_loss(*out)
    directions = function_directions(distillation_losses(out, ref_out), [get_parameter(model, n) for n in names])
    loss.backward()
    explicit = [_explicit_direction(model, reference, n, images, texts) for n in names]
    for direction, want in zip(directions, explicit):
        torch.testing.assert_close(direction, want, rtol=2e-4, atol=1e-6)
    side_by_side = torch.cat([_per_sample(model, n, images, texts).flatten(1) for n in names], dim=1)
    expected = _expected_scores(side_by_side, torch.cat([v.flatten() for v in explicit]))
    torch.testing.assert_close(joint_mimic_scores(probes, directions, global_batch=6), expected, rtol=5e-4, atol=1e-6)
    single = mimic_scores(probes[0], directions[0], global_batch=6)
    assert not torch.allclose(single, expected, rtol=1e-2)  # the text side changes the score: the test sees a missing layer


def test_gradient_checkpointing_keeps_the_function_scores(models):
    """A checkpointed block is recomputed in both backward passes (D's, then the batch loss's): the scores stay the same."""
    model, reference = models
    images, texts = _batch(seed=8)
    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(reference, name).detach()
    results = []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model)
        copy_.set_grad_checkpointing(checkpointing)
        step = MimicStep(copy_, name, "grad-mimic", tau=0.5, reference_weight=w_ref, reference_model=reference, direction="function")
        results.append((step(images, texts).scores, get_parameter(copy_, name).grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-6)
