"""A Stage-1 training step queues its work without waiting for the device: no device-to-host synchronisation in
MimicStep after its first call (the scores reach the host one step late, through raymimic.train.feed.DeferredCopy);
a score-only call waits once, at its end, whatever the number of scoring batches it brings.

On CUDA torch's sync debug mode turns any synchronisation into an error; on the CPU a torch function mode counts the
calls that would synchronise on a GPU: ``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``bool()``/``int()``/
``float()`` of a tensor, ``nonzero`` and boolean-mask indexing."""
from __future__ import annotations

import contextlib
import logging
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

_SYNCING = {torch.Tensor.item, torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__bool__,
            torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}


class CountSyncs(TorchFunctionMode):
    """Records where a call that synchronises with a GPU is made (file:line of the innermost raymimic frame)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []
        self.callers: list[tuple[str, ...]] = []  # per call: the raymimic functions it was made in, outermost first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        masked = func is torch.Tensor.__getitem__ and len(args) > 1 and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool
        if func in _SYNCING or masked:
            frames = [f for f in traceback.extract_stack() if "/raymimic/" in f.filename] or traceback.extract_stack()[-2:-1]
            self.calls.append(f"{getattr(func, '__name__', func)} at {frames[-1].filename}:{frames[-1].lineno}: {frames[-1].line}")
            self.callers.append(tuple(f.name for f in frames if "/raymimic/" in f.filename))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def syncs_counted(device: torch.device):
    """Yields the list of synchronising calls made in the block (on CUDA: any synchronisation raises instead)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield []
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        counter = CountSyncs()
        with counter:
            yield counter.calls


def _models(device):
    from raymimic.clip import create_model

    logging.disable(logging.WARNING)
    try:
        torch.manual_seed(0)
        model = create_model("raymimic-tiny", device=device)[0]
        torch.manual_seed(1)
        return model, create_model("raymimic-tiny", device=device)[0]
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("weighting", ["sgd", "grad-mimic"])
@pytest.mark.parametrize("layer", ["image-mlp", "text-mlp"])
def test_a_training_step_makes_no_host_sync_after_its_first(weighting, layer):
    from raymimic.train.feed import DeferredCopy
    from raymimic.train.step import build_mimic_step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, reference = _models(device)
    step, _ = build_mimic_step(model, "raymimic-tiny", mimic_layer=layer, reference=reference, weighting=weighting,
                               controls=["zero", "fixed", "random"], baselines=["loss", "ref_loss"], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    delivered = []
    copy = DeferredCopy(lambda step_index, arrays: delivered.append(step_index))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g).to(device), torch.randint(1, 400, (8, 16), generator=g).to(device))
               for _ in range(3)]

    optimizer.zero_grad(set_to_none=True)
    first = step(*batches[0])  # the first backward finds how many tokens reach the loss (one sync, once)
    optimizer.step()
    copy.push(0, {"score": first.local_scores, "weight": first.local_weights, **first.local_extra})
    for i in (1, 2):
        optimizer.zero_grad(set_to_none=True)
        with syncs_counted(device) as calls:
            result = step(*batches[i])
        assert calls == [], f"host syncs in step {i}:\n" + "\n".join(calls)
        optimizer.step()  # torch's AdamW reads its step count on the host (a CPU tensor: no device sync on a GPU)
        copy.push(i, {"score": result.local_scores, "weight": result.local_weights, **result.local_extra})  # the one sync
        assert delivered == list(range(i))  # the previous step's scores, now
    copy.flush()
    assert delivered == [0, 1, 2]


def test_the_counter_sees_what_would_synchronise():
    x = torch.arange(4.0)
    with syncs_counted(torch.device("cpu")) as calls:
        x.sum().item(), bool(x.any()), x[x > 1], x.tolist(), int(x[0])
        (x * 2).add_(1)  # device work only
    assert len(calls) == 5, calls


def test_a_score_only_call_waits_for_the_device_only_at_its_end(tmp_path):
    """Every scoring batch of a call is queued (feed, forward, backward, score copies) without a host sync; the
    scores reach the host in the call's final flush. Counted with the function mode on any device (on CUDA the
    final wait is an event's, which the mode does not see; the ``.numpy()`` of the host copies are counted)."""
    import numpy as np

    from raymimic.clip import save_checkpoint
    from raymimic.train.score_only import MimicScorer

    model, reference = _models(torch.device("cpu"))
    checkpoint = save_checkpoint(model, str(tmp_path / "model.pt"), "raymimic-tiny")
    reference = save_checkpoint(reference, str(tmp_path / "ref.pt"), "raymimic-tiny")
    scorer = MimicScorer("raymimic-tiny", checkpoint, reference, micro_batch=4, use_gpu=torch.cuda.is_available(),
                         controls=["zero", "random"], baselines=["loss"])
    rng = np.random.default_rng(0)

    def rows(n):
        return {"uid": np.arange(n).astype(str), "image": rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8),
                "text": rng.integers(1, 400, (n, 16))}

    scorer(rows(4))  # the first backward finds how many tokens reach the loss (one sync, once)
    counter = CountSyncs()
    with counter:
        out = scorer(rows(12))  # three scoring batches
    columns = ["score", "weight", "score_zero", "score_random", "score_loss"]
    assert set(columns) <= set(out) and len(out["score"]) == 12
    assert len(counter.calls) == 3 * len(columns), "\n".join(counter.calls)  # one host copy per score column and batch
    assert all(chain[:3] == ("__call__", "flush", "_deliver_oldest") for chain in counter.callers), "\n".join(counter.calls)
