"""raymimic.train.feed: uint8 pixels normalised on the device equal the CPU preprocessing, batches arrive in order one
ahead, and score copies are delivered one step late, all of them, in order."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch


def _encoded(rng, h, w) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model", ["raymimic-tiny", "ViT-B-32"])
def test_pixels_normalised_by_the_feed_equal_the_cpu_preprocessing_bit_for_bit(model):
    from raymimic.clip.models import transforms_for_model
    from raymimic.data.preprocess import BatchTransform, split_tensor_tail
    from raymimic.train.feed import DeviceFeed

    rng = np.random.default_rng(0)
    images = [_encoded(rng, h, w) for h, w in ((40, 64), (300, 170), (224, 224), (31, 31))]
    transform, _ = transforms_for_model(model)
    floats, ok, _ = BatchTransform(transform)(images)
    pixels, ok_pixels, _ = BatchTransform(transform, pixels=True)(images)
    assert ok == ok_pixels == [0, 1, 2, 3]
    assert pixels.dtype == np.uint8 and pixels.shape == floats.shape and pixels.nbytes * 4 == floats.nbytes
    _, _, mean, std = split_tensor_tail(transform)
    pixels.flags.writeable = False  # as Ray hands batches out
    ((_, fed, texts),) = list(DeviceFeed("cpu", mean, std)([{"image": pixels, "text": np.zeros((4, 3), np.int64)}]))
    assert fed.dtype == torch.float32 and texts.dtype == torch.long
    np.testing.assert_array_equal(fed.numpy(), floats)  # the same operations in the same order: identical, not close


def test_pixels_need_a_transform_that_ends_in_to_tensor():
    from torchvision import transforms as T

    from raymimic.data.preprocess import BatchTransform

    with pytest.raises(ValueError, match="ends in ToTensor"):
        BatchTransform(T.Compose([T.Resize((8, 8)), T.PILToTensor(), T.ConvertImageDtype(torch.float32)]), pixels=True)


def test_the_feed_yields_every_batch_in_order_and_passes_float_images_through():
    from raymimic.train.feed import DeviceFeed

    batches = [{"uid": [i], "image": np.full((1, 3, 2, 2), i, np.float32), "text": np.full((1, 4), i)} for i in range(5)]
    out = list(DeviceFeed("cpu")(iter(batches)))
    assert [b["uid"] for b, _, _ in out] == [[i] for i in range(5)]
    for i, (_, images, texts) in enumerate(out):
        assert images.dtype == torch.float32 and torch.all(images == i) and texts.dtype == torch.long and torch.all(texts == i)
    assert list(DeviceFeed("cpu")(iter([]))) == []


def test_deferred_copies_arrive_one_push_late_and_flush_delivers_the_last():
    from raymimic.train.feed import DeferredCopy

    delivered = []
    copy = DeferredCopy(lambda step, arrays: delivered.append((step, {k: v.tolist() for k, v in arrays.items()})))
    copy.push(0, {"score": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    assert delivered == []
    copy.push(1, {"score": torch.tensor([3.0])})
    assert delivered == [(0, {"score": [1.0, 2.0]})]
    copy.flush()
    copy.flush()  # nothing pending: nothing more
    assert delivered == [(0, {"score": [1.0, 2.0]}), (1, {"score": [3.0]})]


def test_deferred_copies_without_a_depth_wait_for_the_flush_and_keep_their_order():
    from raymimic.train.feed import DeferredCopy

    delivered = []
    copy = DeferredCopy(lambda context, arrays: delivered.append((context, arrays["score"].tolist())), depth=None)
    for i in range(3):
        copy.push(i, {"score": torch.tensor([float(i)])})
    assert delivered == []
    copy.flush()
    assert delivered == [(0, [0.0]), (1, [1.0]), (2, [2.0])]
