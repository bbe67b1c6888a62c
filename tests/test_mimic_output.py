"""The output-space mimic score (the identity in place of the layer's kernel) against autograd: per-sample gradients of the
contrastive loss and the gradient of the distillation loss in the batch's logits, in one process and under 2-process DDP
(gloo); the step's score_output column, which must cost no backward and leave every other column and gradient as it was."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import gloo_group

from raymimic.clip import create_model, per_sample_contrastive_loss, resolve_mimic_layer
from raymimic.mimic import distillation_losses, get_parameter, output_scores
from raymimic.score_table.columns import OUTPUT, column_kind, reference_lift, uses_reference
from raymimic.train.step import MimicStep

MODEL = "raymimic-tiny"


def _batch(n: int = 6, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(1, 400, (n, 16), generator=generator)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = create_model(MODEL)[0].train()
    torch.manual_seed(1)
    reference = create_model(MODEL)[0].eval().requires_grad_(False)
    return target, reference


def _features(model, images, texts, dtype=torch.float64):
    with torch.no_grad():
        return tuple(t.to(dtype) for t in model(images, texts)[:3])


def _autograd_scores(target, reference, kind: str) -> torch.Tensor:
    """e_i = dL_i/d(R, C) per sample and d = dD/d(R, C) by autograd, R and C leaf tensors fed to both losses written out."""
    image, text, scale = target
    ref_image, ref_text, ref_scale = reference
    n = image.shape[0]
    logits = [(scale * image @ text.t()).requires_grad_(True), (scale * text @ image.t()).requires_grad_(True)]
    ref_logits = [ref_scale * ref_image @ ref_text.t(), ref_scale * ref_text @ ref_image.t()]
    labels = torch.arange(n)
    losses = 0.5 * sum(F.cross_entropy(z, labels, reduction="none") for z in logits)
    rows = 0.5 * sum(F.kl_div(F.log_softmax(z, -1), F.log_softmax(r, -1), reduction="none", log_target=True).sum(-1)
                     for z, r in zip(logits, ref_logits))
    # the written-out losses are the project's: the same L_i and d_i from the features
    torch.testing.assert_close(losses, per_sample_contrastive_loss(image, text, scale), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rows.float(), distillation_losses(target, reference), rtol=1e-5, atol=1e-7)
    d = torch.cat([g.flatten() for g in torch.autograd.grad(rows.mean(), logits, retain_graph=True)])
    e = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], logits, retain_graph=True)]) for i in range(n)])
    for i in range(n):  # sample i's loss reaches only its own row of R and of C: the score is local to a worker's rows
        others = torch.ones(n, n, dtype=torch.bool)
        others[i] = False
        assert float(e[i].reshape(2, n, n)[:, others].abs().max()) == 0.0
    dots = e @ d
    return dots / d.norm() if kind == "proj" else dots / (e.norm(dim=1) * d.norm())


@pytest.mark.parametrize("kind", ["proj", "cos"])
def test_output_scores_equal_the_autograd_inner_products_of_the_logit_gradients(models, kind):
    model, reference = models
    images, texts = _batch()
    target, ref = _features(model, images, texts), _features(reference, images, texts)
    expected = _autograd_scores(target, ref, kind)
    assert float(expected.abs().max()) > 1e-3 and float(expected.std()) > 1e-4  # the test can tell a wrong constant or row
    torch.testing.assert_close(output_scores(target, ref, kind=kind), expected, rtol=1e-10, atol=1e-12)
    single = output_scores(tuple(t.float() for t in target), tuple(t.float() for t in ref), kind=kind)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), expected, rtol=1e-4, atol=1e-6)


def test_output_scores_vanish_for_the_reference_itself_and_touch_no_grad(models):
    """d = 0 when the target already matches the reference; the score of a live forward writes no .grad and keeps no graph."""
    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch(seed=2)
    ref = _features(reference, images, texts, torch.float32)
    torch.testing.assert_close(output_scores(ref, ref), torch.zeros(6), rtol=0, atol=0)
    scores = output_scores(tuple(model(images, texts)[:3]), ref)
    assert not scores.requires_grad and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="score kind 'dot'"):
        output_scores(ref, ref, kind="dot")


class _Calls:
    """Counts every backward and every autograd.grad (the step runs them through these two entry points)."""

    def __init__(self, monkeypatch):
        self.backward = self.grad = 0
        backward, grad = torch.autograd.backward, torch.autograd.grad

        def counted_backward(*args, **kwargs):
            self.backward += 1
            return backward(*args, **kwargs)

        def counted_grad(*args, **kwargs):
            self.grad += 1
            return grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "backward", counted_backward)
        monkeypatch.setattr(torch.autograd, "grad", counted_grad)


@pytest.mark.parametrize("reweight_all", [False, True])
def test_step_records_the_closed_form_and_changes_no_other_column_gradient_or_backward(models, monkeypatch, reweight_all):
    model, reference = models
    images, texts = _batch(seed=5)
    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(reference, name).detach()
    expected = output_scores(_features(model, images, texts, torch.float32), _features(reference, images, texts, torch.float32))
    reference_forwards = []
    hook = reference.register_forward_hook(lambda *_: reference_forwards.append(1))
    runs = {}
    try:
        for controls in (["zero", "function"], ["zero", "function", OUTPUT]):
            copy_ = copy.deepcopy(model)
            step = MimicStep(copy_, name, "grad-mimic", tau=0.05, reference_weight=w_ref, reference_model=reference,
                             reweight_all=reweight_all, controls=controls, baselines=["ref_clipscore"])
            calls, reference_forwards[:] = _Calls(monkeypatch), []
            result = step(images, texts)
            monkeypatch.undo()
            runs[OUTPUT in controls] = (step, result, {n: p.grad for n, p in copy_.named_parameters()},
                                        (calls.backward, calls.grad, len(reference_forwards)))
    finally:
        hook.remove()
    (_, plain, plain_grads, plain_calls), (step, with_output, grads, output_calls) = runs[False], runs[True]
    assert step.extra_names == ["zero", "function", OUTPUT, "ref_clipscore"]
    assert list(with_output.extra) == ["score_zero", "score_function", "score_output", "score_ref_clipscore"]
    torch.testing.assert_close(with_output.extra["score_output"], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(with_output.extra["score_output"], with_output.extra["score_function"], rtol=1e-2)
    assert torch.equal(with_output.scores, plain.scores) and torch.equal(with_output.weights, plain.weights)
    for column, values in plain.extra.items():
        assert torch.equal(with_output.extra[column], values), column
    assert grads.keys() == plain_grads.keys()
    for parameter, grad in plain_grads.items():
        assert (grad is None and grads[parameter] is None) or torch.equal(grads[parameter], grad), parameter
    # the same backward passes and autograd.grad calls, and the reference's one forward shared with function and ref_clipscore
    assert output_calls == plain_calls and plain_calls[2] == 1


def test_plain_training_records_the_output_score_without_a_probe(models):
    """weighting sgd and no weight-space reference: the step stays plain data-parallel training, with the column beside it."""
    model, reference = models
    model = copy.deepcopy(model)
    images, texts = _batch(seed=6)
    expected = output_scores(_features(model, images, texts, torch.float32), _features(reference, images, texts, torch.float32),
                             kind="cos")
    step = MimicStep(model, resolve_mimic_layer(model, "image-mlp"), "sgd", score_kind="cos", reference_model=reference,
                     controls=[OUTPUT])
    assert step.plain and step.probe is None
    result = step(images, texts)
    assert list(result.extra) == ["score_output"]
    torch.testing.assert_close(result.extra["score_output"], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.local_extra["score_output"], expected, rtol=1e-5, atol=1e-7)


def test_the_step_refuses_output_as_a_direction_without_the_reference_or_twice(models):
    model, reference = models
    name = resolve_mimic_layer(model, "image-mlp")
    w_ref = get_parameter(reference, name).detach()
    with pytest.raises(ValueError, match="direction 'output' has no weight-space vector") as info:
        MimicStep(model, name, "grad-mimic", reference_weight=w_ref, reference_model=reference, direction=OUTPUT)
    assert "controls=[..., 'output']" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="control 'output'.*needs the reference model"):
        MimicStep(model, name, "grad-mimic", reference_weight=w_ref, controls=[OUTPUT])
    with pytest.raises(ValueError, match="'output' given twice"):
        MimicStep(model, name, "grad-mimic", reference_weight=w_ref, reference_model=reference, controls=[OUTPUT, "zero", OUTPUT])


def test_output_is_a_reference_variant_that_runs_and_settings_take_by_name(capsys):
    from raymimic.app.cli import main
    from raymimic.train.config import ScoreConfig, TrainConfig

    assert column_kind("score_output") == "reference variant" and uses_reference("score_output")
    lift = reference_lift({"score": 0.7, "score_zero": 0.6, "score_function": 0.65, "score_output": 0.8})
    assert lift["controls"] == ["score_zero"] and lift["lifts"]["score_output"] == pytest.approx(0.2)
    base = {"output": "/tmp/x", "model": MODEL, "samples_seen": 16, "global_batch": 8}
    assert TrainConfig(**base, reference="R", controls=["zero", OUTPUT]).controls == ["zero", OUTPUT]
    assert ScoreConfig(pool="P", model=MODEL, reference="R", output="/tmp/x", controls=[OUTPUT]).controls == [OUTPUT]
    with pytest.raises(ValueError, match="'output' needs a reference"):
        TrainConfig(**base, reference=None, weighting="sgd", controls=[OUTPUT])
    with pytest.raises(ValueError, match="direction 'output'"):
        TrainConfig(**base, reference="R", direction=OUTPUT)
    io = ["--pool", "/data/pool", "--reference", "ViT-B-32:datacomp_m_s128m_b4k", "--output", "/runs/r1"]
    assert main(["train", "--preset", "toy", *io, "--controls", "zero,output", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["controls"] == ["zero", OUTPUT]


def test_the_score_only_pass_writes_the_column_beside_unchanged_ones(tmp_path):
    """A checkpoint scored with controls zero and output: score_output beside the columns a run without it writes, bit for bit."""
    import numpy as np

    from raymimic.clip import save_checkpoint
    from raymimic.train.score_only import MimicScorer

    torch.manual_seed(0)
    checkpoint = save_checkpoint(create_model(MODEL)[0], str(tmp_path / "model.pt"), MODEL, step=3, epoch=0)
    torch.manual_seed(1)
    reference = save_checkpoint(create_model(MODEL)[0], str(tmp_path / "ref.pt"), MODEL)
    rng = np.random.default_rng(0)
    rows = {"uid": np.asarray([f"{i:032x}" for i in range(6)], dtype=object),
            "image": rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8), "text": rng.integers(1, 400, (6, 16)).astype(np.int64)}
    plain = MimicScorer(MODEL, checkpoint, reference, controls=["zero"])(rows)
    scored = MimicScorer(MODEL, checkpoint, reference, controls=["zero", OUTPUT])(rows)
    assert set(scored) == {*plain, "score_output"}
    for column, values in plain.items():
        np.testing.assert_array_equal(scored[column], values, err_msg=column)
    output = scored["score_output"]
    assert output.dtype == np.float32 and np.isfinite(output).all() and output.std() > 0


def _ddp_worker(rank, world, init_file, model, reference, images, texts, out):
    from torch.nn.parallel import DistributedDataParallel

    from raymimic.train.step import all_reduce_sum, build_mimic_step, gather_global

    with gloo_group(rank, world, init_file):
        local = len(images) // world
        mine = slice(rank * local, (rank + 1) * local)
        with torch.no_grad():
            target, ref = model(images[mine], texts[mine])[:3], reference(images[mine], texts[mine])[:3]
        bare = output_scores(target, ref, first_index=rank * local, gather=gather_global, all_reduce=all_reduce_sum)
        step, _ = build_mimic_step(model, MODEL, reference=reference, tau=0.05, wrap=DistributedDataParallel, controls=["zero", OUTPUT])
        result = step(images[mine], texts[mine])
        torch.save({"bare": bare, "local": result.local_extra["score_output"], "global": result.extra["score_output"],
                    "has_reference_model": step.reference_model is not None}, f"{out}/rank{rank}.pt")


def test_output_scores_and_step_under_ddp_with_two_processes_equal_the_single_process_batch(models, tmp_path):
    import torch.multiprocessing as mp

    model, reference = models
    images, texts = _batch(n=8, seed=4)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), copy.deepcopy(model), reference, images, texts, str(tmp_path)), nprocs=2)
    expected = output_scores(_features(model, images, texts, torch.float32), _features(reference, images, texts, torch.float32))
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        mine = expected[rank * 4:(rank + 1) * 4]
        torch.testing.assert_close(saved["bare"], mine, rtol=1e-5, atol=1e-7, msg=lambda m, r=rank: f"rank {r}: {m}")
        torch.testing.assert_close(saved["local"], mine, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved["global"], expected, rtol=1e-5, atol=1e-7)
        assert saved["has_reference_model"]
