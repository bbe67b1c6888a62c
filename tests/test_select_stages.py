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
              NormSimFilter(targets=emb[:3], p=np.inf, min_score=0.5), BasicFilter(language_model=languages)]
    out = run_stages(ds, stages)
    out = out.map_batches(lambda b: b.assign(caption_len=b["text"].str.len()), batch_format="pandas")  # a user's own step
    result = out.to_pandas()
    # the teacher (drop=False) keeps exactly the half of the 24 rows above its fitted median
    teacher_scores = teacher._scored.to_pandas()["clip_score"]
    assert len(teacher_scores) == n and (teacher_scores > teacher.threshold).sum() == 12
    assert result["clip_score"].between(-1, 1).all() and result["clip_keep"].tolist() == (result["clip_score"] > teacher.threshold).tolist()
    assert set(result["uid"]) <= set(rows["uid"]) and "caption_len" in result
    assert not result["text"].str.contains("1").any()
    # negCLIPLoss keeps 75% (18 rows) of what it scored; NormSim_inf (max |cos| with the 3 targets)
    # drops rows below 0.5; the language check drops captions with a "1"
    negclip = stages[1]
    negclip_scores = negclip._scored.to_pandas()
    negclip_kept = negclip_scores["negclip_score"] > negclip.threshold
    assert len(negclip_scores) == n and negclip_kept.sum() == 18
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    normsim = dict(zip(rows["uid"], np.abs(unit @ unit[:3].T).max(axis=1)))
    assert sum(v < 0.5 for v in normsim.values()) >= 4  # the NormSim stage has rows to drop
    normsim_kept = negclip_scores["uid"].map(normsim) >= 0.5
    expected = set(negclip_scores.loc[negclip_kept & normsim_kept & ~negclip_scores["text"].str.contains("1"), "uid"])
    np.testing.assert_allclose(result["normsim_score"], result["uid"].map(normsim), rtol=1e-5)
    assert len(result) == len(expected) and set(result["uid"]) == expected
    assert teacher.params()["model"] == "raymimic-tiny"
    with pytest.raises(ValueError, match="exactly one of top_fraction"):
        CLIPScoreFilter()


@pytest.mark.ray
def test_mimic_filter_on_a_pandas_table_decides_as_on_ray(ray_session):
    """The local path (a pandas table, no Ray: what the simulation uses) and the Ray path share the decision logic."""
    from conftest import synthetic_scores

    from raymimic.select.mimic_filter import MimicFilter

    table, _ = synthetic_scores(n_samples=300, batch=30, epochs=2)
    local = MimicFilter(table, method="ensemble").fit()
    on_ray = MimicFilter(ray_session.data.from_pandas(table), method="ensemble").fit()
    got = on_ray.decisions.to_pandas().sort_values("uid", ignore_index=True)
    assert list(local.decisions["uid"]) == list(got["uid"]) and len(got) == 300
    for column in ("n_obs", "votes_gmm", "votes_kmeans", "votes_threshold", "keep_gmm", "keep_kmeans", "keep_threshold", "mimic_keep"):
        np.testing.assert_array_equal(local.decisions[column].to_numpy(), got[column].to_numpy(), err_msg=column)
    for column in ("mimic_score", "mean_norm_weight", "mean_raw_score"):
        np.testing.assert_allclose(local.decisions[column].to_numpy(), got[column].to_numpy(), rtol=1e-12, err_msg=column)
    assert local.stats == on_ray.stats and local.binarizers["gmm"].params() == on_ray.binarizers["gmm"].params()
    assert len(local.apply()) == int(got["mimic_keep"].sum())
    top = MimicFilter(table, method="top-fraction", fraction=0.6).fit().decisions
    assert top["mimic_keep"].mean() == pytest.approx(0.6, abs=0.01)


def test_mimic_filter_leaves_out_a_binarizer_that_cannot_fit():
    from conftest import synthetic_scores

    from raymimic.select.mimic_filter import MimicFilter

    table, _ = synthetic_scores(n_samples=60, batch=30, epochs=2)
    table["weight"] = np.float32(0.5 / 30)  # constant weights: one distinct norm_weight value, nothing for k-means/GMM to split
    with pytest.raises(ValueError, match="distinct"):
        MimicFilter(table, method="ensemble", feature="norm_weight").fit()
    stage = MimicFilter(table, method="ensemble", feature="norm_weight", unfit="skip").fit()
    assert stage.methods == ["threshold"] and set(stage.stats["unfit"]) == {"gmm", "kmeans"}
    assert stage.decisions["mimic_keep"].nunique() == 1  # every row has the same B * w: one decision for all
    table["weight"] = np.float32(1 / 30)  # uniform weights: a weight feature is refused outright, even with unfit="skip"
    with pytest.raises(ValueError, match="uniform weights"):
        MimicFilter(table, method="ensemble", feature="norm_weight", unfit="skip").fit()


def test_one_decoder_and_one_embedder_for_bytes_pixels_and_preprocessed_images():
    import torch

    from raymimic.clip.embed import ClipEmbedder
    from raymimic.data.preprocess import decode_image

    png = _png(3)
    pixels = np.asarray(decode_image(png))
    assert pixels.shape == (40, 40, 3) and np.array_equal(np.asarray(decode_image(pixels)), pixels)
    with pytest.raises(Exception):  # noqa: B017 - truncated data fails in the decoder itself (callers record or raise it)
        decode_image(png[: len(png) // 2])
    torch.manual_seed(0)
    embedder = ClipEmbedder.load("raymimic-tiny")
    preprocessed = embedder.preprocess(decode_image(png)).numpy()
    features = [embedder.embed_images([value]) for value in (png, pixels, preprocessed)]
    for other in features[1:]:
        torch.testing.assert_close(other, features[0])
    assert torch.allclose(features[0].norm(dim=1), torch.ones(1))
    texts = embedder.embed_texts(["a red square", "a dog"])
    tokens = embedder.tokenizer(["a red square", "a dog"]).numpy()
    torch.testing.assert_close(embedder.embed_texts(list(tokens)), texts)
    classes = embedder.embed_classes(["dog"], ["a {}.", "the {}."])
    assert classes.shape == (1, texts.shape[1]) and torch.allclose(classes.norm(dim=1), torch.ones(1))
