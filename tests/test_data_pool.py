"""read_pool: every readable uid exactly once, every other sample listed with its reason."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray


def _jpeg(colour=(200, 30, 30), size=16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _uid(i: int) -> str:
    return f"{i:032x}"


def _write_tar(path, samples):
    """samples: list of (key, {extension: bytes})."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(key, uid, caption="a red square"):
    return key, {"jpg": _jpeg(), "txt": caption.encode(), "json": json.dumps({"uid": uid}).encode()}


@pytest.fixture
def messy_pool(tmp_path):
    """Two shards with one sample of every reject kind, and one truncated shard."""
    shards = tmp_path / "pool" / "shards"
    shards.mkdir(parents=True)
    good_jpeg = _jpeg()
    _write_tar(shards / "00000000.tar", [
        _good("0000", _uid(1)),
        _good("0001", _uid(2).upper()),  # upper case is valid, normalised to lower
        ("0002", {"jpg": b"this is not an image", "txt": b"x y z", "json": json.dumps({"uid": _uid(3)}).encode()}),
        ("0003", {"jpg": good_jpeg, "txt": b"\xff\xfe caption", "json": json.dumps({"uid": _uid(4)}).encode()}),
        ("0004", {"jpg": good_jpeg, "json": json.dumps({"uid": _uid(5)}).encode()}),
        ("0005", {"jpg": good_jpeg, "txt": b"no uid", "json": json.dumps({"url": "http://x"}).encode()}),
        ("0006", {"jpg": good_jpeg, "txt": b"bad uid", "json": json.dumps({"uid": "xyz"}).encode()}),
        _good("0007", _uid(1)),  # duplicate within the shard
        ("0008", {"txt": b"no image", "json": json.dumps({"uid": _uid(8)}).encode()}),
        ("0009", {"jpg": good_jpeg, "txt": b"broken json", "json": b"{not json"}),
    ])
    _write_tar(shards / "00000001.tar", [_good("1000", _uid(10)), _good("1001", _uid(2)), _good("1002", _uid(11))])
    # a truncated shard: the first sample survives, the tar ends inside the second one's image
    _write_tar(shards / "00000002.tar", [_good("2000", _uid(20)), _good("2001", _uid(21))])
    data = (shards / "00000002.tar").read_bytes()
    cut = data.index(b"2001.jpg") + 512 + 100
    (shards / "00000002.tar").write_bytes(data[:cut])
    # truncated inside the header that follows a complete sample: that sample is kept
    _write_tar(shards / "00000003.tar", [_good("3000", _uid(30)), _good("3001", _uid(31))])
    data = (shards / "00000003.tar").read_bytes()
    (shards / "00000003.tar").write_bytes(data[: data.index(b"3001.jpg") + 100])
    return tmp_path / "pool"


def test_every_readable_uid_once_and_every_reject_listed(ray_session, messy_pool):
    from raymimic.data.pool import PoolRejects, read_pool

    rejects = PoolRejects(print_summary=False)
    rows = read_pool(str(messy_pool), rejects=rejects).take_all()
    uids = [row["uid"] for row in rows]
    assert sorted(uids) == sorted([_uid(1), _uid(2), _uid(10), _uid(11), _uid(20), _uid(30)])
    by_key = {row["key"]: row for row in rows}
    assert by_key["0000"]["text"] == "a red square" and by_key["0000"]["image"][:2] == b"\xff\xd8"
    assert by_key["0000"]["shard"].endswith("00000000.tar")

    table = rejects.table().to_pylist()
    reasons = {(os.path.basename(r["shard"]), r["key"]): r["reason"] for r in table}
    expected = {
        ("00000000.tar", "0002"): "corrupt_image",
        ("00000000.tar", "0003"): "caption_not_utf8",
        ("00000000.tar", "0004"): "missing_caption",
        ("00000000.tar", "0005"): "json_without_uid",
        ("00000000.tar", "0006"): "malformed_uid",
        ("00000000.tar", "0007"): "duplicate_uid",
        ("00000000.tar", "0008"): "missing_image",
        ("00000000.tar", "0009"): "invalid_json",
        ("00000002.tar", "2001"): "truncated_tar",
        ("00000003.tar", ""): "truncated_tar",
    }
    # uid 2 is in shards 0 and 1: whichever shard was read first keeps it, the other copy is listed
    duplicate = {k: v for k, v in reasons.items() if k[1] in ("0001", "1001")}
    assert list(duplicate.values()) == ["duplicate_uid"]
    assert {k: v for k, v in reasons.items() if k not in duplicate} == expected
    assert rejects.count() == len(expected) + 1
    assert rejects.counts_by_reason()["duplicate_uid"] == 2
    assert "11 rejected" in rejects.summary() and "4/4 shards" in rejects.summary()


def test_rerunning_the_dataset_does_not_double_count(ray_session, messy_pool, tmp_path):
    from raymimic.data.pool import PoolRejects, read_pool

    rejects = PoolRejects(print_summary=False)
    ds = read_pool(f"file://{messy_pool}", rejects=rejects, columns=["uid", "key"])
    assert ds.count() == 6
    first = ds.take_all()
    assert set(first[0]) == {"uid", "key"}
    assert len(first) == 6 and rejects.count() == 11
    written = rejects.write(str(tmp_path / "rejects.parquet"))
    table = pq.read_table(written)
    assert table.column_names == ["shard", "key", "reason", "detail"] and table.num_rows == 11


def test_unreadable_roots_fail_with_their_name(ray_session, tmp_path):
    from raymimic.data.pool import PoolNotReadableError, read_pool

    missing = tmp_path / "no_such_pool"
    with pytest.raises(PoolNotReadableError, match="no_such_pool"):
        read_pool(str(missing))
    (tmp_path / "empty" / "shards").mkdir(parents=True)
    with pytest.raises(PoolNotReadableError, match="no .tar shards"):
        read_pool(str(tmp_path / "empty"))
    with pytest.raises(PoolNotReadableError, match="memory filesystem"):
        read_pool("memory://pool")
    with pytest.raises(ValueError, match="unknown pool column"):
        read_pool(str(tmp_path / "empty"), columns=["caption"])


def test_metadata_and_embeddings_join_by_uid(ray_session, tmp_path):
    from raymimic.data.metadata import read_metadata
    from raymimic.data.pool import read_pool
    from raymimic_experiments.toy_pool import make_toy_pool

    make_toy_pool(str(tmp_path / "toy"), samples=60, noise=0.5, seed=3, shard_size=25, eval_samples=0, workers=1)
    ds = read_pool(str(tmp_path / "toy"), columns=["uid", "text"], metadata_columns=["clip_b32_similarity_score", "text"],
                   embeddings=["b32_img", "b32_txt"], join_partitions=2)
    batch = ds.take_batch(100, batch_format="numpy")
    assert len(batch["uid"]) == 60 and len(set(batch["uid"])) == 60
    assert list(batch["text"]) == list(batch["metadata_text"])  # joined by uid, not by row position
    assert batch["b32_img"].shape == (60, 512) and batch["b32_img"].dtype == np.float16
    cosine = np.sum(batch["b32_img"].astype(np.float32) * batch["b32_txt"].astype(np.float32), axis=1)
    np.testing.assert_allclose(cosine, batch["clip_b32_similarity_score"], atol=1e-5)

    metadata = read_metadata(f"file://{tmp_path / 'toy'}", columns=["sha256"], embeddings=True)
    assert metadata.count() == 60
    assert set(metadata.schema().names) == {"uid", "sha256", "b32_img", "b32_txt", "l14_img", "l14_txt"}
    with pytest.raises(ValueError, match="unknown embedding"):
        read_metadata(str(tmp_path / "toy"), embeddings=["b16_img"])


def test_preprocess_decodes_tokenizes_and_lists_undecodable_images(ray_session, tmp_path):
    from raymimic.data.pool import PoolRejects, read_pool
    from raymimic.data.preprocess import preprocess_for_clip

    shards = tmp_path / "pool" / "shards"
    shards.mkdir(parents=True)
    from PIL import Image

    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy, format="JPEG")
    truncated_jpeg = noisy.getvalue()[:1500]  # header intact, so the cheap read-time check passes
    _write_tar(shards / "00000000.tar", [
        _good("a", _uid(1), "a red square"),
        ("b", {"jpg": truncated_jpeg, "txt": b"cut off", "json": json.dumps({"uid": _uid(2)}).encode()}),
        _good("c", _uid(3), "another red square"),
    ])

    def transform(image):
        return np.asarray(image.resize((8, 8)), dtype=np.float32).transpose(2, 0, 1) / 255.0

    def tokenizer(texts):
        return np.array([[len(t), len(t.split())] for t in texts])

    rejects = PoolRejects(print_summary=False)
    ds = preprocess_for_clip(read_pool(str(tmp_path / "pool"), rejects=rejects), transform, tokenizer, batch_size=2, rejects=rejects)
    batch = ds.take_batch(10, batch_format="numpy")
    assert sorted(batch["uid"]) == [_uid(1), _uid(3)]
    assert batch["image"].shape == (2, 3, 8, 8) and batch["image"].dtype == np.float32
    assert batch["text"].dtype == np.int64 and sorted(batch["text"][:, 1].tolist()) == [3, 3]
    listed = rejects.table().to_pylist()
    assert [(r["key"], r["reason"]) for r in listed] == [("b", "undecodable_image")]


def test_transforms_for_model_builds_open_clip_preprocessing_without_weights():
    from PIL import Image

    from raymimic.clip.models import transforms_for_model

    transform, tokenizer = transforms_for_model("ViT-B-32")
    image = transform(Image.new("RGB", (32, 20), (255, 0, 0)))
    assert tuple(image.shape) == (3, 224, 224)
    tokens = tokenizer(["a red circle", "a blue square on the left"])
    assert tuple(tokens.shape) == (2, 77)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        transforms_for_model("no-such-model")


def _encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_batched_tensor_tail_is_bit_identical_to_the_transform_image_by_image():
    """The batch path runs ToTensor + Normalize once on uint8 pixels; the output must equal the per-image transform exactly,
    for open_clip's transform, one without Normalize, and images that the batch path cannot stack (other modes and sizes)."""
    import open_clip
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from raymimic.data.preprocess import BatchTransform, decode_image, split_tensor_tail

    rng = np.random.default_rng(3)
    pictures = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((20, 32), (64, 64), (300, 170))]
    images = [_encoded(p, "PNG") for p in pictures] + [_encoded(pictures[1], "JPEG"), _encoded(pictures[2].convert("L"), "PNG"),
                                                       b"not an image"]
    transforms = {
        "open_clip": open_clip.image_transform(48, is_train=False),
        "no normalize": T.Compose([T.Resize((24, 24)), T.ToTensor()]),
        "grey": T.Compose([T.Resize((24, 24)), T.Grayscale(), T.ToTensor(), T.Normalize([0.5], [0.2])]),  # not RGB: image by image
    }
    for transform in transforms.values():
        assert split_tensor_tail(transform) is not None
        good = images[:-1]
        batch, ok, errors = BatchTransform(transform)(good + images[-1:])
        assert ok == list(range(len(good))) and len(errors) == 1 and "UnidentifiedImageError" in errors[0]
        expected = np.stack([np.asarray(transform(decode_image(data)), dtype=np.float32) for data in good])
        assert batch.dtype == np.float32 and batch.flags.c_contiguous
        np.testing.assert_array_equal(batch, expected)  # bit for bit, not approximately
    assert split_tensor_tail(T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5]), T.Resize(8)])) is None  # tail is not ToTensor
    assert split_tensor_tail(lambda image: torch.zeros(3)) is None
    lone = BatchTransform(T.Compose([T.Resize((8, 8)), T.PILToTensor(), T.ConvertImageDtype(torch.float32)]))(images[:2])[0]
    assert lone.shape == (2, 3, 8, 8)  # not a split transform: applied whole, image by image


def test_without_dedup_repeated_uids_are_all_returned(ray_session, messy_pool):
    from raymimic.data.pool import PoolRejects, read_pool

    rejects = PoolRejects(print_summary=False)
    uids = read_pool(str(messy_pool), rejects=rejects, dedup=False, columns=["uid"]).to_pandas()["uid"].tolist()
    assert uids.count(_uid(2)) == 2 and uids.count(_uid(1)) == 2  # across and within shards, as asked
    assert "duplicate_uid" not in rejects.counts_by_reason() and "8 samples read from 4/4 shards" in rejects.summary()


def test_every_shard_is_read_by_its_own_task_under_a_batched_preprocess(ray_session, tmp_path):
    """Reading is a read operator, one task per shard: Ray Data used to fuse a map over shard paths with
    preprocessing's batch_size (in shard rows), so one task read every shard of a small pool serially."""
    import re

    from raymimic.data.pool import read_pool
    from raymimic.data.preprocess import preprocess_for_clip

    shards = tmp_path / "pool" / "shards"
    shards.mkdir(parents=True)
    for s in range(4):
        _write_tar(shards / f"{s:08d}.tar", [_good(f"k{i}", _uid(10 * s + i)) for i in range(3)])

    def transform(image):
        return np.zeros((3, 2, 2), np.float32)

    ds = preprocess_for_clip(read_pool(str(tmp_path / "pool")), transform, lambda texts: np.zeros((len(texts), 2)), batch_size=256)
    assert len(ds.take_all()) == 12
    read_tasks = re.search(r"ReadPoolShards\S*: (\d+) tasks executed", ds.stats())
    assert read_tasks is not None and int(read_tasks.group(1)) == 4, ds.stats()[:500]
