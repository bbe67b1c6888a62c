"""Seed-003 filters: negCLIPLoss, NormSim, CLIPScore (teacher model), basic rules, chaining."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp

from raymimic.select.filters import basic_rules, clip_scores, neg_clip_loss, norm_sim


def test_neg_clip_loss_matches_definition_with_one_batch():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    got = neg_clip_loss(img, txt, batch_size=6, k=3, tau=0.1, rng=rng)
    i = img / np.linalg.norm(img, axis=1, keepdims=True)
    t = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = i @ t.T / 0.1
    expected = np.sum(i * t, axis=1) - 0.1 / 2 * (logsumexp(s, axis=1) + logsumexp(s, axis=0))
    np.testing.assert_allclose(got, expected, rtol=1e-10)  # one batch: every repetition is the same
    assert np.allclose(clip_scores(img, txt), np.sum(i * t, axis=1))


def test_neg_clip_loss_ranks_aligned_pairs_above_confusable_ones():
    rng = np.random.default_rng(1)
    img = rng.standard_normal((64, 16))
    txt = img + 0.1 * rng.standard_normal((64, 16))
    txt[:8] = txt[8]  # 8 captions that match many images: penalised by R(i)
    scores = neg_clip_loss(img, txt, batch_size=16, k=4, tau=0.05, rng=rng)
    assert scores[:8].mean() < scores[9:].mean()
    with pytest.raises(ValueError, match="at least 2"):
        neg_clip_loss(img, txt, batch_size=1)


def test_norm_sim_p2_and_inf():
    targets = np.eye(3)
    x = np.array([[1.0, 0, 0], [1.0, 1.0, 0]])
    np.testing.assert_allclose(norm_sim(x, targets, p=2), [1.0, 1.0])
    np.testing.assert_allclose(norm_sim(x, targets, p=np.inf), [1.0, 1 / np.sqrt(2)])
    with pytest.raises(ValueError, match="p = 2 or inf"):
        norm_sim(x, targets, p=1)


def test_basic_rules():
    texts = ["a dog on grass", "two words", "abc def g", None, "a red car here", "a red car here", "a red car here"]
    widths = np.array([300, 300, 300, 300, 199, 900, 600])
    heights = np.array([300, 300, 300, 300, 300, 299, 200])
    np.testing.assert_array_equal(basic_rules(texts, widths, heights), [True, False, True, False, False, False, True])


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.ray
def test_chain_teacher_clip_normsim_basic_and_user_step(ray_session):
    import ray

    from raymimic.select.filters import BasicFilter, CLIPScoreFilter, NegCLIPLossFilter, NormSimFilter
    from raymimic.select.stages import run_stages

    rng = np.random.default_rng(0)
    n = 24
    rows = pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "image": [_png(i) for i in range(n)],
                         "text": [f"a photo number {i}" for i in range(n)], "original_width": 300, "original_height": 300})
    emb = rng.standard_normal((n, 8)).astype(np.float32)
    rows["l14_img"] = list(emb)
    rows["l14_txt"] = list(emb + 0.3 * rng.standard_normal((n, 8)).astype(np.float32))
    ds = ray.data.from_pandas(rows).repartition(2)
    teacher = CLIPScoreFilter(top_fraction=0.5, model="raymimic-tiny", batch_size=8, drop=False)
    languages = lambda texts: ["en" if "1" not in t else "de" for t in texts]  # noqa: E731  (stands in for a fastText model)
    stages = [teacher, NegCLIPLossFilter(top_fraction=0.75, batch_size=6, k=2, tau=0.1),
              NormSimFilter(targets=emb[:3], p=np.inf, min_score=0.0), BasicFilter(language_model=languages)]
    out = run_stages(ds, stages)
    out = out.map_batches(lambda b: b.assign(caption_len=b["text"].str.len()), batch_format="pandas")  # a user's own step
    result = out.to_pandas()
    assert teacher.threshold is not None and result["clip_score"].between(-1, 1).all()
    assert set(result["uid"]) <= set(rows["uid"]) and "caption_len" in result
    assert not result["text"].str.contains("1").any()
    assert 0 < len(result) <= 18  # negCLIPLoss keeps 75% (18 rows) and the language check removes more
    assert teacher.params()["model"] == "raymimic-tiny"
    with pytest.raises(ValueError, match="exactly one of top_fraction"):
        CLIPScoreFilter()
