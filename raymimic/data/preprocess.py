"""CLIP preprocessing as a Ray Data stage: decode, open_clip image transform, tokenize.

``preprocess_for_clip(ds, transform, tokenizer)`` takes the dataset from
:func:`raymimic.data.pool.read_pool` (columns ``uid``, ``image`` bytes, ``text``) and
returns one with ``uid`` (str), ``image`` (float32, C x H x W) and ``text`` (int64 token
ids, context length), ready for ``ray.train.get_dataset_shard(...).iter_torch_batches()``.
Every output row keeps its ``uid``, so scores computed in training can be traced back.

An image that cannot be decoded is dropped from the batch and recorded in the
:class:`~raymimic.data.pool.PoolRejects` passed as ``rejects`` (reason
``undecodable_image``) rather than failing the job.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence

import numpy as np

DECODE_REASON = "undecodable_image"


def decode_image(value):
    """An RGB PIL image from encoded bytes (JPEG, PNG, ...) or an H x W (x 3) uint8 pixel array.

    The one image decoder of raymimic (training data, the CLIPScore teacher, evaluation). The
    image is decoded in full, so truncated or corrupt data raises here; callers record or raise.
    """
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        with Image.open(io.BytesIO(bytes(value))) as image:
            return image.convert("RGB")
    return Image.fromarray(np.asarray(value, dtype=np.uint8)).convert("RGB")


def split_tensor_tail(transform):
    """``(per_image, tail, mean, std)`` when ``transform`` is a ``Compose`` ending in ToTensor (+ Normalize), else None.

    open_clip's eval transform is Resize, CenterCrop, RGB, ToTensor, Normalize. The last two
    are the same few element-wise float32 operations for every image; run per image they cost
    a call overhead each and a float32 copy when the batch is stacked. Splitting them off lets
    :class:`BatchTransform` apply them once to a uint8 batch, with bit-identical results.
    """
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = list(transform.transforms) if isinstance(transform, Compose) else []
    mean = std = None
    cut = len(steps)
    if steps and isinstance(steps[-1], Normalize):
        mean, std, cut = steps[-1].mean, steps[-1].std, cut - 1
    if cut < 1 or not isinstance(steps[cut - 1], ToTensor):
        return None
    return Compose(steps[:cut - 1]), Compose(steps[cut - 1:]), mean, std


def _reusable_float32(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialised float32 array from Arrow's memory pool.

    A batch is large (150 MB at 224 px). ``torch.empty``/``np.empty`` take fresh pages from the
    kernel every time, tens of thousands of page faults per batch, which cost more than the
    arithmetic that fills them; Arrow's pool (mimalloc or jemalloc) keeps freed pages and hands
    them to the next batch. The array owns its buffer, so it is released when Ray is done with it.
    """
    import pyarrow as pa

    count = int(np.prod(shape))
    return np.frombuffer(pa.allocate_buffer(count * 4), dtype=np.float32, count=count).reshape(shape)


def _rgb_pixels(images: list) -> list[np.ndarray] | None:
    """The images' uint8 pixels when all are PIL RGB images of one size (what the batched tail handles), else None."""
    from PIL import Image

    first = images[0]
    if not all(isinstance(image, Image.Image) and image.mode == "RGB" and image.size == first.size for image in images):
        return None
    return [np.asarray(image) for image in images]


class BatchTransform:
    """An image transform applied to a batch of encoded images: what preprocessing runs per batch.

    Built once (the split and the normalisation constants are not redone per batch). When the
    transform ends in ToTensor (+ Normalize), the steps before them run image by image and the
    tail once on the batch's uint8 pixels (:func:`split_tensor_tail`); otherwise the whole
    transform runs image by image. Either way the output equals the per-image transform exactly.

    With ``pixels=True`` the tail is left to the consumer: the batch comes out as N x 3 x H x W
    uint8 pixels (a quarter of float32's bytes), for :class:`raymimic.train.feed.DeviceFeed` to
    normalise on the training device by the same operations; the transform must then end in
    ToTensor (+ Normalize).
    """

    CHUNK = 8  # images per pass of the tail: a chunk of float32 images stays in the CPU's cache between its passes

    def __init__(self, transform, pixels: bool = False):
        import torch

        split = split_tensor_tail(transform)
        if pixels and split is None:
            raise ValueError("pixels=True needs an image transform that ends in ToTensor (+ Normalize), as open_clip's does; "
                             "this one does not, so give pixels=False (float32 images)")
        self.pixels = pixels
        self.per_image, self.tail = (transform, None) if split is None else split[:2]
        mean, std = (None, None) if split is None else split[2:]
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images) -> tuple[np.ndarray | None, list[int], list[str]]:
        """The decodable images as one array (float32, or uint8 pixels), in order, their indices, and the others' errors."""
        outputs, ok, errors = [], [], []
        for i, data in enumerate(images):
            try:
                outputs.append(self.per_image(decode_image(data)))
                ok.append(i)
            except Exception as error:  # PIL and transforms raise many types for bad data
                errors.append(f"{type(error).__name__}: {error}")
        if not ok:
            return None, ok, errors
        if self.pixels:
            pixels = [np.asarray(image, dtype=np.uint8) for image in outputs]  # H x W (x C): what ToTensor would read
            pixels = np.stack([p[:, :, None] if p.ndim == 2 else p for p in pixels])
            return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)), ok, errors
        if self.tail is not None:
            pixels = _rgb_pixels(outputs)
            if pixels is not None:
                return self._normalized_batch(pixels), ok, errors
            outputs = [self.tail(image) for image in outputs]  # not one size or mode (a custom transform): image by image
        return np.stack([np.asarray(output, dtype=np.float32) for output in outputs]), ok, errors

    def _normalized_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """N x H x W x 3 uint8 pixels -> N x 3 x H x W float32 by the same element-wise operations as ToTensor + Normalize."""
        import torch

        height, width, channels = pixels[0].shape
        out = torch.from_numpy(_reusable_float32((len(pixels), channels, height, width)))
        for start in range(0, len(pixels), self.CHUNK):
            part = out[start:start + self.CHUNK]
            # uint8 -> float32 is exact; the HWC -> CHW reorder rides on this copy (a plain copy handles the strided
            # read faster than a dividing one), then ToTensor's div(255) and Normalize's sub, div, in their order
            part.copy_(torch.from_numpy(np.stack(pixels[start:start + self.CHUNK])).permute(0, 3, 1, 2))
            part.div_(255)
            if self.mean is not None:
                part.sub_(self.mean).div_(self.std)
        return out.numpy()


def _preprocess_batch(batch: dict, *, transform: BatchTransform, tokenizer, ledger, keep_columns) -> Iterator[dict]:
    images, ok, errors = transform(batch["image"])
    if len(ok) < len(batch["uid"]) and ledger is not None:
        import ray

        kept = set(ok)
        failed = [i for i in range(len(batch["uid"])) if i not in kept]
        shards = batch.get("shard", batch["uid"])
        keys = batch.get("key", batch["uid"])
        entries = [(str(shards[i]), str(keys[i]), "preprocess", DECODE_REASON, error) for i, error in zip(failed, errors)]
        ray.get(ledger.add_rejects.remote(entries))
    if not ok:
        return
    texts = [str(batch["text"][i]) for i in ok]
    tokens = tokenizer(texts)
    tokens = tokens.numpy() if hasattr(tokens, "numpy") else np.asarray(tokens)
    out = {"uid": np.asarray(batch["uid"])[ok], "image": images, "text": tokens.astype(np.int64)}
    for name in keep_columns:
        if name not in out:
            out[name] = np.asarray(batch[name])[ok]
    yield out


def preprocess_for_clip(
    ds,
    transform: Callable,
    tokenizer: Callable,
    *,
    batch_size: int = 256,
    rejects=None,
    keep_columns: Sequence[str] = (),
    concurrency: int | None = None,
    num_cpus: float | None = None,
    pixels: bool = False,
):
    """Decode + transform images and tokenize captions as a ``map_batches`` stage.

    ``transform``: PIL image -> C x H x W tensor/array (the model's eval transform, e.g.
    :func:`raymimic.clip.models.transforms_for_model` or the ``preprocess`` of
    ``open_clip.create_model_and_transforms``); ``tokenizer``: list of str -> int token
    array (``open_clip.get_tokenizer(name)``).
    ``rejects``: the :class:`~raymimic.data.pool.PoolRejects` given to ``read_pool``.
    ``keep_columns``: other input columns to carry through (e.g. ``"key"``, ``"shard"``).
    ``pixels``: images as uint8 C x H x W pixels, normalised later on the training device
    (:class:`BatchTransform`), instead of float32.
    """
    ledger = rejects.actor if rejects is not None else None
    extra = {} if num_cpus is None else {"num_cpus": num_cpus}
    from ray.data import TaskPoolStrategy

    return ds.map_batches(
        _preprocess_batch,
        batch_size=batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=concurrency),  # map_batches(concurrency=) is deprecated
        fn_kwargs={"transform": BatchTransform(transform, pixels), "tokenizer": tokenizer, "ledger": ledger,
                   "keep_columns": tuple(keep_columns)},
        **extra,
    )


def clip_training_dataset(pool: str, transform: Callable, tokenizer: Callable, rejects=None, pixels: bool = False):
    """A DataComp pool as (uid, image C x H x W, text int64 tokens): what training and scoring read.

    ``transform`` and ``tokenizer``: the model's (:func:`raymimic.clip.models.transforms_for_model`);
    images float32, or with ``pixels`` uint8 pixels that the training device normalises.
    """
    from raymimic.data.pool import read_pool

    ds = read_pool(pool, columns=["uid", "text", "image"], rejects=rejects)
    return preprocess_for_clip(ds, transform, tokenizer, rejects=rejects, pixels=pixels)
