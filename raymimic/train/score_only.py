"""Score-only pass: mimic scores of every sample of a pool at one fixed checkpoint, no updates.

For pools larger than what one training run sees. A Ray Data ``map_batches`` stage on an
actor pool (one GPU per actor when asked) runs the same step as training
(:class:`~raymimic.train.step.MimicStep`: contrastive loss over the scoring batch, one
backward, the probe's exact per-sample scores, softmax over the batch) and throws the
gradient away. A call brings several scoring batches, all queued on the device before any
score is copied back, so that an actor waits for its GPU once per call. Output rows have the
score-table columns; ``batch_size`` is the number of samples in the scoring batch and
``step``/``epoch`` are the checkpoint's (``-1`` when the checkpoint does not say, e.g. a public
open_clip tag).

Controls and baselines as in training (``score_<name>`` columns), with one difference: at a fixed
checkpoint ``W_0`` *is* the scored weight, so ``init`` (``W_0 - W_ckpt = 0``) is refused, and
``fixed`` and ``current`` would repeat the primary score (``W_ref - W_ckpt``): the default set
drops ``fixed`` and an explicit one is refused
(:func:`raymimic.train.config.resolve_controls`). The ``random`` control's seed is ``seed``
(default 0).
"""
from __future__ import annotations

import numpy as np

from raymimic.score_table import discard_parts, parse_file_name, write_part
from raymimic.train.config import DEFAULT_CONTROLS


def checkpoint_position(checkpoint: str | None) -> tuple[int, int]:
    """``(step, epoch)`` stored in a raymimic checkpoint file; ``(-1, -1)`` otherwise."""
    import os

    import torch

    if not checkpoint or not os.path.isfile(checkpoint):
        return -1, -1
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict):
        return -1, -1
    return int(saved.get("step", -1)), int(saved.get("epoch", -1))


class MimicScorer:
    """Callable for ``map_batches``: numpy batch (uid, image, text) -> score-table rows.

    Every parameter but the mimic layer's is frozen: the backward then runs only from the loss down
    to the mimic layer (for ``image-mlp`` the image tower's last block and the loss; the text
    tower's backward disappears), and the scores are those of the full backward, which
    ``full_backward=True`` still runs (for comparisons). ``micro_batch``: rows per scoring batch when a call
    brings several (``None``: the call is one scoring batch).
    """

    def __init__(self, model: str, checkpoint: str | None, reference: str, mimic_layer: str = "image-mlp",
                 score_kind: str = "proj", tau: float = 0.05, step: int | None = None, use_gpu: bool = False,
                 controls=DEFAULT_CONTROLS, baselines=(), seed: int = 0, full_backward: bool = False,
                 micro_batch: int | None = None):
        import torch

        from raymimic.clip import create_model, transforms_for_model
        from raymimic.data.preprocess import split_tensor_tail
        from raymimic.train.config import parse_control, resolve_baselines, resolve_controls
        from raymimic.train.feed import DeviceFeed
        from raymimic.train.step import build_mimic_step

        controls = resolve_controls(list(controls), reference=True, score_only=True)
        baselines = resolve_baselines(list(baselines), reference=True)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = create_model(model, pretrained=checkpoint, device=self.device)[0]
        split = split_tensor_tail(transforms_for_model(model)[0])  # uint8 pixels are normalised on the device
        self.feed = DeviceFeed(self.device, *(split[2:] if split is not None else (None, None)))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.step_fn, _ = build_mimic_step(self.model, model, mimic_layer=mimic_layer, reference=reference, weighting="grad-mimic",
                                           tau=tau, score_kind=score_kind, device=self.device, autocast=autocast,
                                           controls=[parse_control(c) for c in controls], baselines=baselines, seed=seed)
        if not full_backward:  # only the mimic layer's output gradient is needed: no other parameter's
            self.model.requires_grad_(False)
            self.step_fn.parameter.requires_grad_(True)
        local = checkpoint if checkpoint and "://" not in checkpoint else None
        found_step, self.epoch = checkpoint_position(local)
        self.step = found_step if step is None else step
        self.micro_batch = micro_batch

    def __call__(self, batch: dict) -> dict:
        """Score one call's rows, ``micro_batch`` rows (the scoring batch) at a time, in order.

        Every micro-batch's forward and backward is queued before any score reaches the host: its scores start their
        copy to the host right after its step (:class:`~raymimic.train.feed.DeferredCopy` with ``depth=None``) and the
        call waits for the device once, at its end. The next micro-batch's inputs are copied while a step runs
        (:class:`~raymimic.train.feed.DeviceFeed`)."""
        from raymimic.train.feed import DeferredCopy

        n_rows = len(batch["uid"])
        size = self.micro_batch or n_rows
        parts = [{column: values[start:start + size] for column, values in batch.items()} for start in range(0, n_rows, size)]
        delivered: list[dict[str, np.ndarray]] = []
        copy = DeferredCopy(lambda _, arrays: delivered.append(arrays), depth=None)
        for _, images, texts in self.feed(parts):
            self.model.zero_grad(set_to_none=True)
            result = self.step_fn(images, texts)
            copy.push(None, {"score": result.scores, "weight": result.weights, **result.extra})
        self.model.zero_grad(set_to_none=True)  # scoring only: no update
        copy.flush()
        sizes = [len(part["uid"]) for part in parts]
        return {
            "uid": np.asarray([str(u) for u in batch["uid"]], dtype=object),
            "step": np.full(n_rows, self.step, dtype=np.int64),
            "epoch": np.full(n_rows, self.epoch, dtype=np.int32),
            "rank": np.zeros(n_rows, dtype=np.int32),
            **{column: np.concatenate([arrays[column] for arrays in delivered]) for column in delivered[0]},
            "batch_size": np.repeat(np.asarray(sizes, dtype=np.int32), sizes),
        }


def score_dataset(ds, model: str, checkpoint: str | None, reference: str, *, mimic_layer: str = "image-mlp",
                  score_kind: str = "proj", tau: float = 0.05, batch_size: int = 256, actors: int = 1,
                  use_gpu: bool = False, step: int | None = None, controls=DEFAULT_CONTROLS, baselines=(),
                  batches_per_call: int = 4):
    """Ray Data stage: a dataset of (uid, image, text) -> one score-table row per sample (plus ``score_<name>`` columns).

    Each ``map_batches`` call brings ``batches_per_call`` scoring batches of ``batch_size`` rows (its last may be
    shorter), scored one after the other with one wait for the device per call (:meth:`MimicScorer.__call__`).
    """
    if batches_per_call < 1:
        raise ValueError(f"batches_per_call must be at least 1, got {batches_per_call}")
    return ds.map_batches(
        MimicScorer,
        fn_constructor_kwargs=dict(model=model, checkpoint=checkpoint, reference=reference, mimic_layer=mimic_layer,
                                   score_kind=score_kind, tau=tau, step=step, use_gpu=use_gpu, controls=list(controls),
                                   baselines=list(baselines), micro_batch=batch_size),
        batch_size=batch_size * batches_per_call,
        batch_format="numpy",
        compute=_actor_pool(actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )


def _actor_pool(actors: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=actors)


def _write_block(table, uri: str):
    """``map_batches`` body of :func:`write_scores`: one block -> one score file; returns its name and steps."""
    import pyarrow as pa

    name = write_part(table, uri)
    if name is None:
        return pa.table({"file": pa.array([], pa.string()), "first_step": pa.array([], pa.int64()), "last_step": pa.array([], pa.int64())})
    first, last, _, _ = parse_file_name(name)
    return pa.table({"file": [name], "first_step": pa.array([first], pa.int64()), "last_step": pa.array([last], pa.int64())})


def write_scores(scored, output: str) -> str:
    """Write the scored dataset under ``<output>/scores/`` as score files the readers find; returns that URI.

    Each block becomes one file, written atomically and named
    ``steps-{step}-{step}-rank-00000-part-{hash}.parquet`` (:func:`raymimic.score_table.write_part`)
    with the hash of its (uid, step) pairs: a block written again by a retried task replaces its
    file. Columns are cast to the contract's types (``score_<name>`` columns kept, others
    dropped). Once every block is written, score-only files of the same step(s) left by an earlier
    pass into the same folder are deleted, so rerunning replaces the output instead of doubling it.
    """
    uri = f"{output.rstrip('/')}/scores"
    written = scored.map_batches(_write_block, fn_kwargs={"uri": uri}, batch_format="pyarrow", batch_size=None).take_all()
    if written:
        first, last = min(int(r["first_step"]) for r in written), max(int(r["last_step"]) for r in written)
        discard_parts(uri, {r["file"] for r in written}, first, last)
    return uri


def run_score_only(cfg) -> str:
    """The whole score-only pass for a :class:`~raymimic.train.config.ScoreConfig`; returns the score table's URI.

    Reads ``cfg.pool`` as the CLIP training dataset of ``cfg.model``, scores it (:func:`score_dataset`)
    and writes ``<cfg.output>/scores/`` (:func:`write_scores`). A checkpoint given as a path or URI is
    copied to local disk first; a pretrained tag is passed on as is. Needs a running (or startable) Ray.
    """
    from raymimic.clip.models import local_copy, transforms_for_model
    from raymimic.data.preprocess import clip_training_dataset

    checkpoint = cfg.checkpoint
    if checkpoint and ("://" in checkpoint or "/" in checkpoint):
        checkpoint = local_copy(checkpoint)
    dataset = clip_training_dataset(cfg.pool, *transforms_for_model(cfg.model), pixels=True)  # normalised on the device
    scored = score_dataset(dataset, cfg.model, checkpoint, cfg.reference,
                           mimic_layer=cfg.mimic_layer, score_kind=cfg.score_kind, tau=cfg.tau, batch_size=cfg.batch_size,
                           actors=cfg.actors, use_gpu=cfg.use_gpu, step=cfg.step, controls=cfg.controls, baselines=cfg.baselines)
    return write_scores(scored, cfg.output)
