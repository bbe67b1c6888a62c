"""The contrastive loss's all-gather with gradient (raymimic.clip.loss) on two gloo processes: each rank's features and
gradients are exactly those of one process computing the global batch's loss, through both backward paths (the
all-reduce of gloo and the reduce-scatter NCCL uses, run on gloo here)."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import gloo_group


def _gather_worker(rank, world, init_file, out, reduce_scatter):
    from raymimic.clip import loss

    if reduce_scatter:  # run the reduce-scatter backward (NCCL's) on gloo
        loss.REDUCE_SCATTER_BACKENDS = ("gloo",)
    with gloo_group(rank, world, init_file):
        images, texts = _features(world * 3)
        mine = slice(rank * 3, (rank + 1) * 3)
        image, text = images[mine].clone().requires_grad_(True), texts[mine].clone().requires_grad_(True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gathered = loss.gather_with_grad(image)
            local = loss.contrastive_loss(image, text, torch.tensor(7.0))
            local.backward()
        torch.save({"gathered": gathered.detach(), "image_grad": image.grad, "text_grad": text.grad, "loss": local.detach(),
                    "warnings": [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]}, f"{out}/rank{rank}.pt")


def _features(n):
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n, 5, generator=g), dim=-1)
    return images, texts


@pytest.mark.parametrize("reduce_scatter", [False, True], ids=["all-reduce", "reduce-scatter"])
def test_two_processes_gather_exactly_and_get_their_rows_gradients_without_warnings(tmp_path, reduce_scatter):
    """Each rank's gradient is ``world * dL/dy`` of the global mean loss for its own rows (the loss module's contract)."""
    import torch.multiprocessing as mp

    from raymimic.clip.loss import contrastive_loss

    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path), reduce_scatter), nprocs=world)
    images, texts = _features(world * 3)
    images.requires_grad_(True), texts.requires_grad_(True)
    full = contrastive_loss(images, texts, torch.tensor(7.0))
    full.backward()
    losses = []
    for rank in range(world):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["warnings"] == []
        torch.testing.assert_close(saved["gathered"], images.detach())
        mine = slice(rank * 3, (rank + 1) * 3)
        torch.testing.assert_close(saved["image_grad"], world * images.grad[mine], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(saved["text_grad"], world * texts.grad[mine], rtol=1e-5, atol=1e-7)
        losses.append(saved["loss"])
    torch.testing.assert_close(torch.stack(losses).mean(), full.detach())
