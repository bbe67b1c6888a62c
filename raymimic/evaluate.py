"""Evaluation of any open_clip checkpoint over a Ray Dataset: zero-shot classification and
image-text retrieval (recall@1/5).

The dataset needs an ``image`` column (encoded bytes, or a preprocessed CxHxW float array)
and, per task, ``text`` (retrieval) and an integer label column (zero-shot). Embedding runs
in ``map_batches`` on an actor pool (one GPU each when asked), so a user's own evaluation set
on a cluster works the same as the toy pool's held-out split; zero-shot predictions are made
inside the actors, and only retrieval brings the (N x D) embeddings to the driver.

Checkpoints are open_clip's format, so DataComp's own evaluation loads them unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


class _Embedder:
    """Ray Data actor: loads the model once (:class:`~raymimic.clip.embed.ClipEmbedder`), embeds batches, predicts zero-shot classes."""

    def __init__(self, model_name: str, checkpoint: str | None, classnames: Sequence[str] | None,
                 templates: Sequence[str], label_column: str, device: str):
        from raymimic.clip.embed import ClipEmbedder

        self.embedder = ClipEmbedder.load(model_name, checkpoint, device)
        self.label_column = label_column
        self.class_embeddings = self.embedder.embed_classes(classnames, templates) if classnames else None

    def __call__(self, batch: dict) -> dict:
        out = {}
        image_f = self.embedder.embed_images(batch["image"])
        out["image_features"] = image_f.float().cpu().numpy()
        if "text" in batch:
            out["text_features"] = self.embedder.embed_texts(batch["text"]).float().cpu().numpy()
        if self.class_embeddings is not None:
            labels = np.asarray(batch[self.label_column]).astype(np.int64)
            logits = image_f @ self.class_embeddings.t()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu().numpy()
            out["top1"] = (top[:, 0] == labels).astype(np.float64)
            out["top5"] = (top == labels[:, None]).any(axis=1).astype(np.float64)
            out["prediction"] = top[:, 0]
            out[self.label_column] = labels
        return out


def embed(dataset, model_name: str, checkpoint: str | None = None, *, classnames=None, templates=DEFAULT_TEMPLATES,
          label_column: str = "label", batch_size: int = 256, concurrency: int = 1, num_gpus: float = 0):
    """Dataset -> Dataset with ``image_features`` (and ``text_features``, zero-shot columns)."""
    device = "cuda" if num_gpus else "cpu"
    from ray.data import ActorPoolStrategy

    keep = [c for c in ("image", "text", label_column) if c in dataset.columns()]
    return dataset.select_columns(keep).map_batches(
        _Embedder,
        fn_constructor_args=(model_name, checkpoint, list(classnames) if classnames else None, list(templates), label_column, device),
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=concurrency), num_gpus=num_gpus,
    )


def retrieval_recall(image_features: np.ndarray, text_features: np.ndarray, ks: Sequence[int] = (1, 5), chunk: int = 2048) -> dict:
    """Recall@k for image->text and text->image, pair i being the match of row i."""
    n = len(image_features)
    if n == 0:
        raise ValueError("retrieval needs at least one image-text pair")
    result = {}
    for direction, queries, keys in (("image_to_text", image_features, text_features), ("text_to_image", text_features, image_features)):
        ranks = np.empty(n, dtype=np.int64)
        for start in range(0, n, chunk):
            sims = queries[start:start + chunk] @ keys.T
            own = sims[np.arange(len(sims)), np.arange(start, start + len(sims))]
            ranks[start:start + chunk] = (sims > own[:, None]).sum(axis=1)  # how many keys beat the match
        for k in ks:
            result[f"{direction}_recall@{k}"] = float((ranks < k).mean())
    return result


def evaluate(checkpoint: str | None, dataset, model_name: str, *, classnames: Sequence[str] | None = None,
             templates: Sequence[str] = DEFAULT_TEMPLATES, label_column: str = "label", retrieval: bool = True,
             batch_size: int = 256, concurrency: int = 1, num_gpus: float = 0) -> dict:
    """Zero-shot accuracy (top-1/top-5, per class) and retrieval recall@1/5 of a checkpoint.

    ``checkpoint`` is an open_clip checkpoint path/URI or pretrained tag of ``model_name``
    (``None``: random init, a floor for comparisons).
    """
    if classnames is None and not retrieval:
        raise ValueError("nothing to evaluate: pass classnames for zero-shot and/or retrieval=True")
    if classnames is not None and label_column not in dataset.columns():
        raise ValueError(f"zero-shot needs a label column {label_column!r}; dataset has {dataset.columns()}")
    embedded = embed(dataset, model_name, checkpoint, classnames=classnames, templates=templates, label_column=label_column,
                     batch_size=batch_size, concurrency=concurrency, num_gpus=num_gpus).materialize()
    result: dict = {"model": model_name, "checkpoint": checkpoint, "samples": embedded.count()}
    if classnames is not None:
        cols = embedded.select_columns(["top1", "top5", "prediction", label_column]).to_pandas()
        result["zeroshot_top1"] = float(cols["top1"].mean())
        result["zeroshot_top5"] = float(cols["top5"].mean())
        per_class = cols.groupby(label_column)["top1"].mean()
        result["zeroshot_per_class"] = {classnames[int(k)]: float(v) for k, v in per_class.items()}
    if retrieval and "text_features" in embedded.columns():
        feats = embedded.select_columns(["image_features", "text_features"]).to_numpy_refs()
        import ray

        parts = ray.get(feats)
        result.update(retrieval_recall(np.concatenate([p["image_features"] for p in parts]),
                                       np.concatenate([p["text_features"] for p in parts])))
    return result
