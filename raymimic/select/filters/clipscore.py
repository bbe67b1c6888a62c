"""CLIPScore: the cosine of a teacher CLIP's image and text embeddings, from metadata columns or an open_clip model."""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.select.filters.common import (
    normalize_rows,
)
from raymimic.select.stages import ScoreFilter


def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    return np.sum(normalize_rows(image_embeddings.astype(np.float32)) * normalize_rows(text_embeddings.astype(np.float32)), axis=1)


class _TeacherEmbedder:
    """Ray Data actor: the teacher (:class:`~raymimic.clip.embed.ClipEmbedder`), loaded once, scores image-caption pairs."""

    def __init__(self, model: str, pretrained: str | None, image_column: str, text_column: str, device: str):
        from raymimic.clip.embed import ClipEmbedder

        self.embedder = ClipEmbedder.load(model, pretrained, device)
        self.image_column, self.text_column = image_column, text_column

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        image_features = self.embedder.embed_images(list(batch[self.image_column]))
        text_features = self.embedder.embed_texts([str(t) for t in batch[self.text_column]])
        batch["clip_score"] = (image_features * text_features).sum(dim=1).float().cpu().numpy()
        return batch


class CLIPScoreFilter(ScoreFilter):
    """Keep the top fraction (DataComp: 30% with L/14) or scores >= ``min_score`` (B/32: 0.25).

    Score source, in order: ``model`` (an open_clip name, with ``pretrained`` a tag, path or
    URI) computed from ``image_column`` (bytes or HxWx3 uint8) and ``text_column``; else
    the precomputed metadata column ``column`` (``clip_l14_similarity_score`` by default).
    """

    name = "clip"

    def __init__(self, top_fraction: float | None = None, min_score: float | None = None, column: str = "clip_l14_similarity_score",
                 model: str | None = None, pretrained: str | None = None, image_column: str = "image", text_column: str = "text",
                 batch_size: int = 64, concurrency: int = 1, num_gpus: float = 0, drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.column, self.model, self.pretrained = column, model, pretrained
        self.image_column, self.text_column = image_column, text_column
        self.batch_size, self.concurrency, self.num_gpus = batch_size, concurrency, num_gpus

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        if self.column not in batch.columns:
            raise ValueError(f"CLIPScoreFilter: column {self.column!r} is missing (have {list(batch.columns)}); "
                             "use a DataComp metadata column or give model=")
        return batch[self.column].to_numpy(dtype=np.float64, na_value=np.nan)

    def scored(self, ds):
        if self.model is None:
            return super().scored(ds)
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        import ray

        device = "cuda" if self.num_gpus else "cpu"
        out = ds.map_batches(_TeacherEmbedder, fn_constructor_kwargs={"model": self.model, "pretrained": self.pretrained,
                                                                      "image_column": self.image_column,
                                                                      "text_column": self.text_column, "device": device},
                             batch_format="pandas", batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(size=self.concurrency),
                             num_gpus=self.num_gpus or None)
        out = out.rename_columns({"clip_score": self.score_column})
        if self.top_fraction is not None:
            out = out.materialize()
        self._scored, self._scored_source = out, ds
        return out

    def params(self) -> dict:
        return {**super().params(), "column": None if self.model else self.column, "model": self.model, "pretrained": self.pretrained}
