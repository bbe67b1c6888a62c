import io

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raymimic.clip import create_model, get_tokenizer, save_checkpoint
from raymimic.evaluate import DEFAULT_TEMPLATES, evaluate, retrieval_recall


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
    loaded, _, preprocess = open_clip.create_model_and_transforms("raymimic-tiny", pretrained=path)
    assert torch.equal(loaded.visual.proj, model.visual.proj)
    # 10 classes, so top-5 is not 1 by construction; every image and caption distinct (no ties)
    names = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
    colors = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (128, 0, 128), (255, 165, 0), (240, 240, 240), (0, 0, 0),
              (255, 192, 203), (139, 69, 19)]
    rows = [
        {"image": _png(tuple(min(255, c + 7 * i) for c in colors[i % 10])), "text": f"a {names[i % 10]} square, number {i}",
         "label": i % 10}
        for i in range(12)
    ]
    classnames = [f"{n} square" for n in names]
    ds = ray_session.data.from_items(rows)
    result = evaluate(path, ds, "raymimic-tiny", classnames=classnames, batch_size=5)
    assert result["samples"] == 12
    # the same numbers computed directly, in one process, with the checkpoint open_clip loaded
    loaded.eval()
    tokenizer = get_tokenizer("raymimic-tiny")
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in rows])
        image_f = loaded.encode_image(images, normalize=True)
        text_f = loaded.encode_text(tokenizer([r["text"] for r in rows]), normalize=True)
        class_f = torch.stack(
            [F.normalize(loaded.encode_text(tokenizer([t.format(c) for t in DEFAULT_TEMPLATES]), normalize=True).mean(0), dim=0)
             for c in classnames]
        )
    labels = torch.tensor([r["label"] for r in rows])
    ranked = (image_f @ class_f.t()).argsort(dim=1, descending=True)
    hit1, hit5 = ranked[:, 0] == labels, (ranked[:, :5] == labels[:, None]).any(dim=1)
    assert result["zeroshot_top1"] == pytest.approx(hit1.float().mean().item())
    assert result["zeroshot_top5"] == pytest.approx(hit5.float().mean().item())
    assert 0 < result["zeroshot_top5"] < 1  # this case exercises top-5 with k < number of classes
    per_class = {classnames[c]: hit1[labels == c].float().mean().item() for c in labels.unique().tolist()}
    assert result["zeroshot_per_class"] == pytest.approx(per_class)
    for direction, sims in (("image_to_text", image_f @ text_f.t()), ("text_to_image", text_f @ image_f.t())):
        position = (sims.argsort(dim=1, descending=True) == torch.arange(12)[:, None]).int().argmax(dim=1)  # where the match ranks
        for k in (1, 5):
            assert result[f"{direction}_recall@{k}"] == pytest.approx((position < k).float().mean().item()), (direction, k)
    with pytest.raises(ValueError, match="label column"):
        evaluate(path, ds.drop_columns(["label"]), "raymimic-tiny", classnames=["a", "b", "c"])
