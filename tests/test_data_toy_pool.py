"""The toy pool: DataComp layout, exact noise kinds, determinism, teacher scores, readability."""
from __future__ import annotations

import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from raymimic_experiments.toy_pool import BOILERPLATE, CLASS_NAMES, KINDS, SHORT_CAPTIONS, make_toy_pool


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "pool"
    summary = make_toy_pool(str(out), samples=90, noise=0.4, seed=7, shard_size=40, eval_samples=32, image_size=24, workers=1)
    return out, summary


def _truth(out):
    return pq.read_table(out / "ground_truth.parquet").to_pandas()


def test_layout_is_datacomp(toy):
    out, summary = toy
    assert summary["shards"] == 3
    shards = sorted(os.listdir(out / "shards"))
    assert shards == [f"{i:08d}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")]
    metadata = sorted(os.listdir(out / "metadata"))
    assert metadata == [f"{i:08d}{suffix}" for i in range(3) for suffix in (".npz", ".parquet")]
    table = pq.read_table(out / "metadata" / "00000000.parquet")
    assert table.column_names == ["uid", "url", "text", "original_width", "original_height", "clip_b32_similarity_score",
                                  "clip_l14_similarity_score", "face_bboxes", "sha256"]
    with np.load(out / "metadata" / "00000000.npz") as npz:
        assert {k: npz[k].shape for k in npz.files} == {
            "b32_img": (40, 512), "b32_txt": (40, 512), "l14_img": (40, 768), "l14_txt": (40, 768)
        }
        assert npz["l14_img"].dtype == np.float16
        np.testing.assert_allclose(np.linalg.norm(npz["b32_img"].astype(np.float32), axis=1), 1.0, atol=2e-3)
        cosine = np.sum(npz["l14_img"].astype(np.float32) * npz["l14_txt"].astype(np.float32), axis=1)
        np.testing.assert_allclose(cosine, table.column("clip_l14_similarity_score").to_numpy(), atol=1e-5)
    with tarfile.open(out / "shards" / "00000001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000100000.jpg", "000100000.txt", "000100000.json"]
        meta = json.loads(tar.extractfile(names[2]).read())
    assert meta["status"] == "success" and len(meta["uid"]) == 32 and meta["width"] == 24
    stats = json.loads((out / "shards" / "00000001_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 40


def test_noise_kinds_are_exact_and_look_like_web_noise(toy):
    out, _ = toy
    truth = _truth(out)
    assert len(truth) == 90 and truth["uid"].is_unique
    counts = truth["kind"].value_counts().to_dict()
    assert counts == {"clean": 54, "swapped_caption": 12, "short_caption": 12, "boilerplate": 12}
    assert (truth["is_noisy"] == (truth["kind"] != "clean")).all()
    for row in truth.itertuples():
        if row.kind == "clean":
            assert row.class_name in row.text
        elif row.kind == "swapped_caption":
            assert row.class_name not in row.text and any(name in row.text for name in CLASS_NAMES)
        elif row.kind == "short_caption":
            assert row.text in SHORT_CAPTIONS and len(row.text.split()) <= 2
        else:
            assert row.text in BOILERPLATE
    assert set(truth["kind"]) <= set(KINDS)


def test_teacher_scores_prefer_clean_captions_but_not_perfectly(toy):
    out, _ = toy
    metadata = __import__("pandas").concat(pq.read_table(out / "metadata" / f"{i:08d}.parquet").to_pandas() for i in range(3))
    merged = metadata.merge(_truth(out), on="uid")
    mean = merged.groupby("kind")["clip_b32_similarity_score"].mean()
    assert mean["clean"] > mean["swapped_caption"] + 0.05
    assert mean["clean"] > mean["boilerplate"] + 0.1 and mean["clean"] > mean["short_caption"] + 0.1
    assert merged.loc[merged.kind == "clean", "clip_b32_similarity_score"].std() > 0.02


def test_eval_split_is_clean_and_labelled(toy):
    out, _ = toy
    assert json.loads((out / "eval" / "classnames.json").read_text()) == CLASS_NAMES
    templates = json.loads((out / "eval" / "templates.json").read_text())
    assert all("{}" in t for t in templates)
    with tarfile.open(out / "eval" / "00000000.tar") as tar:
        metas = [json.loads(tar.extractfile(n).read()) for n in tar.getnames() if n.endswith(".json")]
        captions = [tar.extractfile(n).read().decode() for n in tar.getnames() if n.endswith(".txt")]
    assert len(metas) == 32
    assert all(CLASS_NAMES[m["cls"]] in caption for m, caption in zip(metas, captions))
    assert not set(m["uid"] for m in metas) & set(_truth(out)["uid"])


def test_same_seed_same_bytes_other_seed_differs(toy, tmp_path):
    out, _ = toy
    again = tmp_path / "again"
    make_toy_pool(str(again), samples=90, noise=0.4, seed=7, shard_size=40, eval_samples=32, image_size=24, workers=1)
    for name in ("shards/00000002.tar", "eval/00000000.tar", "metadata/00000001.npz"):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    assert _truth(out).equals(_truth(again))
    other = tmp_path / "other"
    make_toy_pool(str(other), samples=90, noise=0.4, seed=8, shard_size=40, eval_samples=0, image_size=24, workers=1)
    assert (out / "shards/00000000.tar").read_bytes() != (other / "shards/00000000.tar").read_bytes()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="noise"):
        make_toy_pool(str(tmp_path), samples=10, noise=1.5)
    with pytest.raises(ValueError, match="samples"):
        make_toy_pool(str(tmp_path), samples=0, noise=0.1)


@pytest.mark.ray
def test_read_pool_returns_every_toy_uid_once(ray_session, toy):
    from raymimic.data.pool import PoolRejects, read_pool

    out, _ = toy
    rejects = PoolRejects(print_summary=False)
    uids = read_pool(f"file://{out}", columns=["uid"], rejects=rejects).to_pandas()["uid"]
    assert sorted(uids) == sorted(_truth(out)["uid"])
    assert rejects.count() == 0


def test_cli_writes_a_pool(tmp_path, capsys):
    from raymimic.app.cli import main

    assert main(["make-toy-pool", "--output", str(tmp_path / "cli"), "--samples", "12", "--noise", "0.25",
                 "--shard-size", "5", "--eval-samples", "4", "--workers", "1"]) == 0
    assert "wrote 12 samples in 3 shards" in capsys.readouterr().out
    assert _truth(tmp_path / "cli")["is_noisy"].sum() == 3


def test_mixed_source_uses_real_handwritten_digits(tmp_path):
    from raymimic_experiments.toy_pool import DIGIT_CLASSES, SHAPE_CLASSES

    out = tmp_path / "mixed"
    summary = make_toy_pool(str(out), samples=60, noise=0.0, seed=1, shard_size=60, eval_samples=20, workers=1, images="mixed")
    classnames = json.loads((out / "eval" / "classnames.json").read_text())
    assert summary["classes"] == 26 and classnames == SHAPE_CLASSES + DIGIT_CLASSES
    truth = _truth(out)
    digits = truth[truth["class_name"].str.startswith("handwritten")]
    assert 5 < len(digits) < 55
    assert all(classnames[label] == name for label, name in zip(truth["label"], truth["class_name"]))
    assert all(name in text for name, text in zip(truth["class_name"], truth["text"]))
    with pytest.raises(ValueError, match="images must be one of"):
        make_toy_pool(str(tmp_path / "bad"), samples=5, noise=0.0, images="faces")


def test_relabelling_is_one_way_natural_and_spread_over_pairs(tmp_path):
    import pandas as pd

    from raymimic_experiments.toy_pool import RELABELLED, relabel_pairs

    summary = make_toy_pool(str(tmp_path / "sys"), samples=4000, noise=0.2, seed=3, shard_size=1000, eval_samples=50, workers=1,
                            relabel=0.1, relabel_pairs=4)
    truth = pd.read_parquet(tmp_path / "sys" / "ground_truth.parquet")
    relabelled = truth[truth["kind"] == RELABELLED]
    pairs = relabel_pairs(3, "shapes", 4)
    names = CLASS_NAMES
    assert summary["relabel_pairs"] == [f"{names[a]} -> {names[b]}" for a, b in pairs]
    sources, targets = {names[a] for a, _ in pairs}, {names[b] for _, b in pairs}
    assert not sources & targets  # one way: no class is both relabelled and a relabel target
    assert set(zip(relabelled["class_name"], relabelled["caption_class"])) == {(names[a], names[b]) for a, b in pairs}
    # each pair holds about relabel / pairs of the pool (binomial spread), no pair dominates
    per_pair = relabelled.groupby("class_name").size()
    assert len(per_pair) == 4 and per_pair.between(0.015 * 4000, 0.035 * 4000).all(), per_pair
    # natural captions: the clean template with the class name replaced
    for text, source, target in zip(relabelled["text"], relabelled["class_name"], relabelled["caption_class"]):
        assert target in text and source not in text
    # random corruption is untouched: exactly round(noise * n), split evenly
    assert truth["kind"].isin(["swapped_caption", "short_caption", "boilerplate"]).sum() == 800
    assert truth.loc[truth["kind"] == "clean", "caption_class"].eq(truth.loc[truth["kind"] == "clean", "class_name"]).all()
    assert summary["kinds"][RELABELLED] == len(relabelled)
    # the teacher's embeddings follow the caption: relabelled pairs score like swapped captions, below clean ones
    files = (tmp_path / "sys" / "metadata").glob("*.parquet")
    metadata = pd.concat(pd.read_parquet(p, columns=["uid", "clip_l14_similarity_score"]) for p in files)
    scores = metadata.merge(truth, on="uid")
    by_kind = scores.groupby("kind")["clip_l14_similarity_score"].mean()
    assert by_kind[RELABELLED] < by_kind["clean"] - 0.1


def test_relabelling_is_deterministic_and_leaves_a_plain_pool_unchanged(tmp_path):
    import pandas as pd

    for name in ("a", "b"):
        make_toy_pool(str(tmp_path / name), samples=600, noise=0.2, seed=5, shard_size=300, eval_samples=0, workers=1, relabel=0.08)
    a, b = (pd.read_parquet(tmp_path / n / "ground_truth.parquet") for n in ("a", "b"))
    assert a.equals(b)
    make_toy_pool(str(tmp_path / "plain"), samples=600, noise=0.2, seed=5, shard_size=300, eval_samples=0, workers=1)
    plain = pd.read_parquet(tmp_path / "plain" / "ground_truth.parquet")
    assert "relabelled" not in set(plain["kind"])
    moved = a["kind"] == "relabelled"
    assert moved.any() and a.loc[~moved, "text"].equals(plain.loc[~moved, "text"])  # only relabelled captions differ


def test_too_much_relabelling_is_refused_with_the_numbers(tmp_path):
    from raymimic_experiments.toy_pool import ToyPoolConfig

    with pytest.raises(ValueError, match="holds only"):
        make_toy_pool(str(tmp_path / "x"), samples=100, noise=0.5, relabel=0.2, relabel_pairs=2, workers=1)
    with pytest.raises(ValueError, match="at most 8 pairs"):
        ToyPoolConfig(output=str(tmp_path / "y"), samples=100, relabel=0.1, relabel_pairs=9)
