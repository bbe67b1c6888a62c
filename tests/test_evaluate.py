import io

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from raymimic.clip import create_model, save_checkpoint
from raymimic.evaluate import evaluate, retrieval_recall


def test_retrieval_recall_perfect_and_shuffled():
    feats = np.eye(8, dtype=np.float32)
    perfect = retrieval_recall(feats, feats)
    assert perfect["image_to_text_recall@1"] == 1.0 and perfect["text_to_image_recall@5"] == 1.0
    shifted = retrieval_recall(feats, np.roll(feats, 1, axis=0))
    # exactly one wrong text beats each match: missed at 1, found at 5
    assert shifted["image_to_text_recall@1"] == 0.0 and shifted["image_to_text_recall@5"] == 1.0


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def test_evaluate_checkpoint_over_a_ray_dataset(ray_session, tmp_path):
    torch.manual_seed(0)
    model, _, _ = create_model("raymimic-tiny")
    path = save_checkpoint(model, str(tmp_path / "tiny.pt"), "raymimic-tiny")
    # the checkpoint is open_clip's format: open_clip's own factory loads it by path
    loaded, _, _ = open_clip.create_model_and_transforms("raymimic-tiny", pretrained=path)
    assert torch.equal(loaded.visual.proj, model.visual.proj)
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]
    rows = [{"image": _png(colors[i % 3]), "text": f"a {['red', 'blue', 'green'][i % 3]} square", "label": i % 3} for i in range(12)]
    ds = ray_session.data.from_items(rows)
    result = evaluate(path, ds, "raymimic-tiny", classnames=["red square", "blue square", "green square"], batch_size=5)
    assert result["samples"] == 12
    assert 0.0 <= result["zeroshot_top1"] <= result["zeroshot_top5"] <= 1.0
    assert result["zeroshot_top5"] == 1.0  # only three classes
    assert set(result["zeroshot_per_class"]) == {"red square", "blue square", "green square"}
    # identical images/captions repeat, so some ties: recall is a fraction in [0, 1]
    assert 0.0 <= result["image_to_text_recall@1"] <= result["image_to_text_recall@5"] <= 1.0
    with pytest.raises(ValueError, match="label column"):
        evaluate(path, ds.drop_columns(["label"]), "raymimic-tiny", classnames=["a", "b", "c"])
