"""A DataComp-layout pool as tensors, read in one process (tar shards, the model's transform and tokenizer)."""
from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PoolTensors:
    """Every decodable sample of a pool split, in shard order."""

    uids: list[str]
    images: torch.Tensor  # N x C x H x W, float32, model-normalised
    texts: torch.Tensor  # N x context length, int64 token ids
    labels: np.ndarray | None = None  # eval split: class index from the sample's json

    def __len__(self) -> int:
        return len(self.uids)

    def subset(self, keep: np.ndarray) -> PoolTensors:
        index = np.flatnonzero(np.asarray(keep, dtype=bool))
        labels = None if self.labels is None else self.labels[index]
        return PoolTensors([self.uids[i] for i in index], self.images[index], self.texts[index], labels)


def _samples(shard: str):
    """(key, {ext: bytes}) of a webdataset tar, in archive order."""
    groups: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as archive:
        for member in archive:
            if member.isfile():
                key, _, ext = member.name.rpartition(".")
                groups.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return groups.items()


def load_split(pool: str, model_name: str, split: str = "shards") -> PoolTensors:
    """Read ``pool/split/*.tar`` (``shards`` or ``eval``) into tensors for ``model_name``."""
    from raymimic.clip.models import transforms_for_model
    from raymimic.data.preprocess import decode_image

    shards = sorted(glob.glob(os.path.join(pool, split, "*.tar")))
    if not shards:
        raise FileNotFoundError(f"no .tar shards under {os.path.join(pool, split)}")
    transform, tokenizer = transforms_for_model(model_name)
    uids, images, captions, labels = [], [], [], []
    for shard in shards:
        for key, files in _samples(shard):
            meta = json.loads(files["json"])
            try:
                image = transform(decode_image(files["jpg"]))
            except Exception as err:  # a corrupt sample is reported, never silently dropped
                raise ValueError(f"{shard}: sample {key} has an undecodable image ({err})") from err
            uids.append(meta["uid"])
            images.append(image)
            captions.append(files["txt"].decode("utf-8"))
            labels.append(meta.get("cls", -1))
    texts = tokenizer(captions)
    has_labels = split == "eval"
    return PoolTensors(uids, torch.stack(images), texts, np.asarray(labels, dtype=np.int64) if has_labels else None)
