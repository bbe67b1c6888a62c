"""Filters beside the mimic score (SPEC section 3), as chainable Ray Data stages.

- :class:`CLIPScoreFilter`: cosine of a teacher CLIP's image and text embeddings, read from
  DataComp's metadata columns or computed with an open_clip model in ``map_batches``;
- :class:`NegCLIPLossFilter`: negCLIPLoss(i) = CLIPScore(i) - R(i), from embeddings;
- :class:`NormSimFilter`: NormSim_p(i) = ||(<f_t, f_i>)_t||_p against target embeddings;
- :class:`BasicFilter`: DataComp's basic rules (English, caption length, image size/shape).

The maths of each score is a plain numpy function (tested directly); the stage classes only
wire it into Ray Data.
"""
from __future__ import annotations

import io
import logging
import warnings
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from raymimic.select.stages import FilterStage, ScoreFilter

log = logging.getLogger(__name__)


def _matrix(batch: pd.DataFrame, column: str) -> np.ndarray:
    if column not in batch.columns:
        raise ValueError(f"column {column!r} is missing (have {list(batch.columns)}); read the pool with embeddings, e.g. read_metadata(pool, embeddings=[...])")
    return np.stack([np.asarray(v, dtype=np.float32) for v in batch[column].to_numpy()]) if len(batch) else np.zeros((0, 1), np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------- CLIPScore
def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    return np.sum(_normalize(image_embeddings.astype(np.float32)) * _normalize(text_embeddings.astype(np.float32)), axis=1)


class _TeacherEmbedder:
    """Loads an open_clip model once per actor and embeds images and captions."""

    def __init__(self, model: str, pretrained: str | None, image_column: str, text_column: str, device: str):
        import torch

        from raymimic.clip.models import create_model, get_tokenizer

        self.torch = torch
        self.model, _, self.preprocess = create_model(model, pretrained=pretrained, device=device)
        self.model.eval()
        self.tokenizer = get_tokenizer(model)
        self.image_column, self.text_column, self.device = image_column, text_column, device

    def _image(self, value):
        from PIL import Image

        if isinstance(value, (bytes, bytearray)):
            return Image.open(io.BytesIO(value)).convert("RGB")
        return Image.fromarray(np.asarray(value, dtype=np.uint8)).convert("RGB")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        torch = self.torch
        images = torch.stack([self.preprocess(self._image(v)) for v in batch[self.image_column]]).to(self.device)
        texts = self.tokenizer([str(t) for t in batch[self.text_column]]).to(self.device)
        with torch.no_grad():
            image_features = self.model.encode_image(images, normalize=True)
            text_features = self.model.encode_text(texts, normalize=True)
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
            raise ValueError(f"CLIPScoreFilter: column {self.column!r} is missing (have {list(batch.columns)}); use a DataComp metadata column or give model=")
        return batch[self.column].to_numpy(dtype=np.float64, na_value=np.nan)

    def scored(self, ds):
        if self.model is None:
            return super().scored(ds)
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        device = "cuda" if self.num_gpus else "cpu"
        out = ds.map_batches(_TeacherEmbedder, fn_constructor_kwargs={"model": self.model, "pretrained": self.pretrained, "image_column": self.image_column,
                                                                      "text_column": self.text_column, "device": device},
                             batch_format="pandas", batch_size=self.batch_size, concurrency=self.concurrency, num_gpus=self.num_gpus or None)
        out = out.rename_columns({"clip_score": self.score_column})
        if self.top_fraction is not None:
            out = out.materialize()
        self._scored, self._scored_source = out, ds
        return out

    def params(self) -> dict:
        return {**super().params(), "column": None if self.model else self.column, "model": self.model, "pretrained": self.pretrained}


# ----------------------------------------------------------------------- negCLIPLoss
def neg_clip_loss(image_embeddings: np.ndarray, text_embeddings: np.ndarray, batch_size: int, k: int = 10, tau: float = 0.01,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """negCLIPLoss(i) = CLIPScore(i) - R(i) over ``k`` random batches of ``batch_size`` rows.

    R(i) = (tau / 2K) sum_k [logsumexp_j s_ij/tau + logsumexp_j s_ji/tau], s_ij = <img_i, txt_j>.
    Each repetition shuffles the rows and cuts them into batches, so every row is in exactly
    one batch per repetition. **[ours]** A last, shorter batch (or a shard smaller than
    ``batch_size``) would lower R for its rows only because it sums fewer terms, so each
    logsumexp is corrected by log(batch_size / len(batch)) (the sum of a full batch with the
    same mean term), which makes scores from different shards comparable.
    """
    if batch_size < 2:
        raise ValueError(f"negCLIPLoss needs batches of at least 2 rows, got batch_size={batch_size}")
    if k < 1 or tau <= 0:
        raise ValueError(f"negCLIPLoss needs k >= 1 and tau > 0 (got k={k}, tau={tau})")
    from scipy.special import logsumexp

    rng = rng or np.random.default_rng(0)
    img = _normalize(image_embeddings.astype(np.float64))
    txt = _normalize(text_embeddings.astype(np.float64))
    n = len(img)
    r = np.zeros(n)
    for _ in range(k):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            s = img[idx] @ txt[idx].T / tau
            correction = np.log(batch_size / len(idx))
            r[idx] += logsumexp(s, axis=1) + logsumexp(s, axis=0) + 2 * correction
    return np.sum(img * txt, axis=1) - tau * r / (2 * k)


class NegCLIPLossFilter(ScoreFilter):
    """negCLIPLoss from embeddings (keep the top 30% in the paper); every shard is scored.

    The random batches are drawn within each block (one metadata file per block), so no
    global shuffle is needed; paper settings: |B| = 32768, K = 10, tau = 0.01.
    """

    name = "negclip"

    def __init__(self, top_fraction: float | None = 0.3, min_score: float | None = None, image_column: str = "l14_img", text_column: str = "l14_txt",
                 batch_size: int = 32768, k: int = 10, tau: float = 0.01, seed: int = 0, drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.image_column, self.text_column, self.batch_size, self.k, self.tau, self.seed = image_column, text_column, batch_size, k, tau, seed
        self.map_kwargs = {"batch_size": None}  # one whole block (shard) per call

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0)
        if len(batch) < 2:
            raise ValueError("negCLIPLoss needs at least 2 rows per shard to form a batch")
        seed = [self.seed, int.from_bytes(str(batch["uid"].iloc[0]).encode()[:8], "little")] if "uid" in batch else self.seed
        return neg_clip_loss(_matrix(batch, self.image_column), _matrix(batch, self.text_column), self.batch_size, self.k, self.tau, np.random.default_rng(seed))

    def params(self) -> dict:
        return {**super().params(), "batch_size": self.batch_size, "k": self.k, "tau": self.tau, "image_column": self.image_column, "text_column": self.text_column}


# -------------------------------------------------------------------------- NormSim
def norm_sim(embeddings: np.ndarray, targets: np.ndarray, p: float = 2) -> np.ndarray:
    """NormSim_p(i) = || (<f_t, f_i>)_{t in targets} ||_p, p = 2 or inf."""
    if p not in (2, np.inf, float("inf")):
        raise ValueError(f"NormSim uses p = 2 or inf, got {p!r}")
    similarities = _normalize(embeddings.astype(np.float32)) @ _normalize(targets.astype(np.float32)).T
    return np.max(np.abs(similarities), axis=1) if np.isinf(p) else np.linalg.norm(similarities, axis=1)


def load_targets(targets) -> np.ndarray:
    """Target embeddings as an array, from an array or a ``.npy`` file (any fsspec URI)."""
    if isinstance(targets, str):
        import fsspec

        with fsspec.open(targets, "rb") as f:
            targets = np.load(io.BytesIO(f.read()), allow_pickle=False)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or len(targets) == 0:
        raise ValueError(f"target embeddings must be a non-empty 2-D array [n_targets, dim], got shape {targets.shape}")
    return targets


class NormSimFilter(ScoreFilter):
    """NormSim against the embeddings of the downstream (target) data the user supplies."""

    name = "normsim"

    def __init__(self, targets, p: float = 2, top_fraction: float | None = None, min_score: float | None = None, column: str = "l14_img", drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.targets, self.p, self.column = load_targets(targets), p, column
        norm_sim(self.targets[:1], self.targets, p)  # validate p now, not inside a Ray task

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        matrix = _matrix(batch, self.column)
        if len(batch) and matrix.shape[1] != self.targets.shape[1]:
            raise ValueError(f"{self.column} has dimension {matrix.shape[1]} but the targets have {self.targets.shape[1]}")
        return norm_sim(matrix, self.targets, self.p) if len(batch) else np.zeros(0)

    def params(self) -> dict:
        return {**super().params(), "p": "inf" if np.isinf(self.p) else self.p, "column": self.column, "n_targets": int(len(self.targets))}


# ---------------------------------------------------------------------- basic rules
def basic_rules(texts: Sequence, widths: np.ndarray, heights: np.ndarray, min_size: int = 200, max_aspect: float = 3.0) -> np.ndarray:
    """DataComp's basic rules except language: caption > 2 words and > 5 characters,
    min(width, height) >= ``min_size``, aspect ratio <= ``max_aspect``. Missing values fail."""
    texts = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts]
    words = np.array([len(t.split()) for t in texts])
    chars = np.array([len(t) for t in texts])
    w = np.asarray(pd.to_numeric(pd.Series(widths), errors="coerce"), dtype=np.float64)
    h = np.asarray(pd.to_numeric(pd.Series(heights), errors="coerce"), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        small, large = np.minimum(w, h), np.maximum(w, h)
        return (words > 2) & (chars > 5) & (small >= min_size) & (large / small <= max_aspect)


def fasttext_language_model(path: str) -> Callable[[list[str]], list[str]]:
    """A language identifier from a fastText model file (e.g. lid.176.bin); needs `fasttext`."""
    try:
        import fasttext
    except ImportError as exc:
        raise ImportError("the language check needs the `fasttext` package (pip install fasttext) to read " + path) from exc
    from raymimic.clip.models import local_copy

    model = fasttext.load_model(local_copy(path))

    def identify(texts: list[str]) -> list[str]:
        labels, _ = model.predict([t.replace("\n", " ") for t in texts])
        return [label[0].replace("__label__", "") if label else "" for label in labels]

    return identify


class BasicFilter(FilterStage):
    """DataComp basic filtering on metadata columns ``text, original_width, original_height``.

    ``language_model``: a fastText model path, or a callable ``texts -> language codes``;
    without one the English check is skipped with a warning (recorded in ``params``).
    """

    name = "basic"

    def __init__(self, language_model: str | Callable | None = None, language: str = "en", min_size: int = 200, max_aspect: float = 3.0, drop: bool = True):
        super().__init__(drop)
        self.language_model, self.language, self.min_size, self.max_aspect = language_model, language, min_size, max_aspect
        if language_model is None:
            warnings.warn("BasicFilter: no language model given (fastText lid model path); the English-caption check is skipped", stacklevel=2)
        self.fitted = True

    def annotate(self, ds):
        model_spec, language, min_size, max_aspect, keep_column = self.language_model, self.language, self.min_size, self.max_aspect, self.keep_column
        cache = {}

        def decide(batch: pd.DataFrame) -> pd.DataFrame:
            for column in ("text", "original_width", "original_height"):
                if column not in batch.columns:
                    raise ValueError(f"BasicFilter needs column {column!r} (DataComp metadata); have {list(batch.columns)}")
            keep = basic_rules(batch["text"].tolist(), batch["original_width"].to_numpy(), batch["original_height"].to_numpy(), min_size, max_aspect)
            if model_spec is not None:
                if "model" not in cache:
                    cache["model"] = fasttext_language_model(model_spec) if isinstance(model_spec, str) else model_spec
                languages = cache["model"](["" if t is None else str(t) for t in batch["text"]])
                keep &= np.array([lang == language for lang in languages], dtype=bool)
            batch[keep_column] = keep
            return batch

        return ds.map_batches(decide, batch_format="pandas")

    def params(self) -> dict:
        spec = self.language_model if isinstance(self.language_model, str) or self.language_model is None else getattr(self.language_model, "__name__", "callable")
        return {**super().params(), "language_model": spec, "language_check": self.language_model is not None, "language": self.language,
                "min_size": self.min_size, "max_aspect": self.max_aspect}
