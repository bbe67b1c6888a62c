"""Score-only pass: mimic scores of every sample of a pool at one fixed checkpoint, no updates.

For pools larger than what one training run sees. A Ray Data ``map_batches`` stage on an
actor pool (one GPU per actor when asked) runs the same step as training
(:class:`~raymimic.train.step.MimicStep`: contrastive loss over the scoring batch, one
backward, the probe's exact per-sample scores, softmax over the batch) and throws the
gradient away. Output rows have the score-table columns; ``batch_size`` is the number of
samples in the scoring batch and ``step``/``epoch`` are the checkpoint's (``-1`` when the
checkpoint does not say, e.g. a public open_clip tag).
"""
from __future__ import annotations

import numpy as np

from raymimic.score_table import SCHEMA


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
    """Callable for ``map_batches``: numpy batch (uid, image, text) -> score-table rows."""

    def __init__(self, model: str, checkpoint: str | None, reference: str, mimic_layer: str = "image-mlp",
                 score_kind: str = "proj", tau: float = 0.05, step: int | None = None, use_gpu: bool = False):
        import torch

        from raymimic.clip import create_model, load_reference, resolve_mimic_layer, sample_dim
        from raymimic.mimic import get_parameter
        from raymimic.train.step import MimicStep

        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = create_model(model, pretrained=checkpoint, device=self.device)[0]
        name = resolve_mimic_layer(self.model, mimic_layer)
        reference_weight = get_parameter(load_reference(reference, model, device=self.device), name).detach().clone()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else None
        self.step_fn = MimicStep(self.model, name, "grad-mimic", tau=tau, score_kind=score_kind,
                                 reference_weight=reference_weight, batch_dim=sample_dim(self.model, name), autocast=autocast)
        local = checkpoint if checkpoint and "://" not in checkpoint else None
        found_step, self.epoch = checkpoint_position(local)
        self.step = found_step if step is None else step

    def __call__(self, batch: dict) -> dict:
        import torch

        images = torch.as_tensor(np.asarray(batch["image"]), dtype=torch.float32).to(self.device)
        texts = torch.as_tensor(np.asarray(batch["text"]), dtype=torch.long).to(self.device)
        self.model.zero_grad(set_to_none=True)
        result = self.step_fn(images, texts)
        self.model.zero_grad(set_to_none=True)  # scoring only: no update
        n = len(images)
        return {
            "uid": np.asarray([str(u) for u in batch["uid"]], dtype=object),
            "step": np.full(n, self.step, dtype=np.int64),
            "epoch": np.full(n, self.epoch, dtype=np.int32),
            "rank": np.zeros(n, dtype=np.int32),
            "score": result.scores.float().cpu().numpy(),
            "weight": result.weights.float().cpu().numpy(),
            "batch_size": np.full(n, n, dtype=np.int32),
        }


def score_dataset(ds, model: str, checkpoint: str | None, reference: str, *, mimic_layer: str = "image-mlp",
                  score_kind: str = "proj", tau: float = 0.05, batch_size: int = 256, actors: int = 1,
                  use_gpu: bool = False, step: int | None = None):
    """Ray Data stage: a dataset of (uid, image, text) -> one score-table row per sample."""
    return ds.map_batches(
        MimicScorer,
        fn_constructor_kwargs=dict(model=model, checkpoint=checkpoint, reference=reference, mimic_layer=mimic_layer,
                                   score_kind=score_kind, tau=tau, step=step, use_gpu=use_gpu),
        batch_size=batch_size,
        batch_format="numpy",
        compute=_actor_pool(actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )


def _actor_pool(actors: int):
    from ray.data import ActorPoolStrategy

    return ActorPoolStrategy(size=actors)


def write_scores(scored, output: str) -> str:
    """Write the scored dataset as parquet under ``<output>/scores/`` with the contract's types."""
    import pyarrow as pa

    def cast(table: pa.Table) -> pa.Table:
        return table.select(SCHEMA.names).cast(SCHEMA)

    uri = f"{output.rstrip('/')}/scores"
    scored.map_batches(cast, batch_format="pyarrow", batch_size=None).write_parquet(uri)
    return uri
