"""open_clip models: creation by name, reference models, checkpoints.

Architectures are data: besides open_clip's own names (``ViT-B-32`` ...), raymimic registers
small JSON configs from ``model_configs/`` (``raymimic-tiny`` for tests, ``raymimic-small``
for the toy pool) with open_clip's registry, so every open_clip API accepts them by name.

A *reference* is given as ``MODEL:TAG`` (an open_clip pretrained tag, e.g.
``ViT-B-32:datacomp_m_s128m_b4k``), a bare ``TAG`` for the trained architecture, a local
checkpoint path, or any fsspec URI (``s3://...``, ``gs://...``), copied to a local cache
first because open_clip loads from local files.
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

import fsspec
import open_clip
import torch
from torch import nn

CONFIG_DIR = Path(__file__).with_name("model_configs")
_registered = False


def register_model_configs() -> None:
    """Make raymimic's configs known to open_clip (idempotent, per process)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def check_model_name(name: str) -> None:
    register_model_configs()
    if name not in open_clip.list_models() and not name.startswith(("hf-hub:", "local-dir:")):
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ValueError(f"unknown open_clip model {name!r}; closest names: {close}")


def create_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu", precision: str = "fp32", **kwargs):
    """``(model, preprocess_train, preprocess_val)`` for an open_clip model name.

    ``pretrained`` is a tag of that model, a local checkpoint or an fsspec URI.
    """
    check_model_name(name)
    if pretrained and not _is_tag(name, pretrained):
        pretrained = local_copy(pretrained)
    return open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device, precision=precision, **kwargs)


def create_seeded_model(name: str, seed: int, pretrained: str | None = None, device: str | torch.device = "cpu",
                        precision: str = "fp32"):
    """:func:`create_model` after seeding as open_clip's training app does before it builds the model.

    ``open_clip_train.main`` calls ``random_seed(args.seed, 0)`` (``torch.manual_seed``,
    ``numpy.random.seed`` and ``random.seed``, each with ``seed``) and then
    ``create_model_and_transforms``; open_clip builds every model on the CPU and moves it to
    ``device`` afterwards. A random initialisation made here is therefore, bit for bit, the one a
    public checkpoint trained with ``--seed seed`` started from, given the same architecture,
    open_clip and torch versions, and a precision that keeps float32 weights (``fp32``, ``amp``,
    ``amp_bf16``; ``fp16``/``bf16`` round the initial weights).
    """
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return create_model(name, pretrained=pretrained, device=device, precision=precision)


def get_tokenizer(name: str):
    register_model_configs()
    return open_clip.get_tokenizer(name)


def _is_tag(model_name: str, value: str) -> bool:
    return value in open_clip.list_pretrained_tags_by_model(model_name)


def local_copy(uri: str, cache_dir: str | None = None) -> str:
    """A local path for ``uri``: local files as they are, remote files copied once into a cache.

    The cache key is the URI plus the remote file's version (ETag / generation / mtime, and
    size), so a file rewritten at the same URI is fetched again instead of a stale copy being
    used. Concurrent callers (training workers on one node) each download to a temporary name
    and rename it into place atomically.
    """
    if os.path.isfile(uri):
        return uri
    if uri.startswith("file://") and os.path.isfile(uri[len("file://"):]):
        return uri[len("file://"):]
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        fs.invalidate_cache(path)  # a listing cached earlier in this process may predate a rewrite
        info = fs.info(path)
    except FileNotFoundError:
        info = None
    if info is None or info.get("type") == "directory":
        raise FileNotFoundError(f"checkpoint {uri!r} does not exist (expected an open_clip checkpoint file)")
    version = "|".join(f"{k}={info[k]}" for k in _VERSION_FIELDS if info.get(k) is not None)
    cache = Path(cache_dir or os.environ.get("RAYMIMIC_CACHE", Path.home() / ".cache" / "raymimic"))
    target = cache / hashlib.sha1(f"{uri}\0{version}".encode()).hexdigest()[:16] / Path(path).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        try:
            fs.get_file(path, str(tmp))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return str(target)


# fields of fsspec ``info()`` that change when a file is rewritten (s3fs, gcsfs, adlfs, local, ...)
_VERSION_FIELDS = ("ETag", "etag", "generation", "VersionId", "version_id", "mtime", "LastModified", "last_modified", "updated", "size")


def parse_reference(spec: str, model_name: str) -> tuple[str, str]:
    """``(model name, tag or local checkpoint path)`` for a reference spec."""
    register_model_configs()
    if "://" in spec or os.path.exists(spec):
        return model_name, local_copy(spec)
    if ":" in spec:
        ref_model, tag = spec.split(":", 1)
        check_model_name(ref_model)
        return ref_model, tag
    if _is_tag(model_name, spec):
        return model_name, spec
    raise ValueError(
        f"reference {spec!r} is neither a checkpoint path/URI nor MODEL:TAG nor a pretrained tag of {model_name!r} "
        f"(tags: {open_clip.list_pretrained_tags_by_model(model_name)})"
    )


def _architecture(name: str) -> nn.Module:
    """A randomly initialised ``name`` only to compare shapes, without open_clip's 'No pretrained weights loaded' warning."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name)
    finally:
        logging.disable(previous)


def load_reference(spec: str | nn.Module, model_name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The frozen reference model; its architecture must equal ``model_name``'s."""
    from raymimic.mimic.params import check_same_architecture

    register_model_configs()
    if isinstance(spec, nn.Module):
        check_same_architecture(_architecture(model_name), spec)
        return spec.eval().requires_grad_(False)
    ref_model, source = parse_reference(spec, model_name)
    expected = _architecture(ref_model)
    if os.path.isfile(source):  # compare shapes first: a clearer error than load_state_dict's
        check_same_architecture(expected, read_state_dict(source), what=f"reference checkpoint {spec}")
    if ref_model != model_name:
        check_same_architecture(_architecture(model_name), expected, what=f"reference model {ref_model}")
    reference, _, _ = create_model(ref_model, pretrained=source, device=device)
    return reference.eval().requires_grad_(False)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of an open_clip checkpoint file (``state_dict`` key and ``module.`` prefixes handled)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_checkpoint(model: nn.Module, uri: str, name: str, **extra) -> str:
    """Write an open_clip checkpoint (``{"name", "state_dict", ...}``) to a path or fsspec URI.

    ``open_clip.create_model_and_transforms(name, pretrained=path)`` loads it unchanged.
    """
    from raymimic.mimic.params import unwrap

    state = {"name": name, "state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, **extra}
    with fsspec.open(uri, "wb") as f:
        torch.save(state, f)
    return uri


def transforms_for_model(model_name: str):
    """The eval-time image transform and the tokenizer open_clip uses for ``model_name``.

    Built from the model's config alone, without creating the model or loading weights.
    """
    register_model_configs()  # raymimic-tiny / raymimic-small are ours: open_clip knows them only once registered
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; open_clip.list_models() gives the valid names")
    image_size = config["vision_cfg"].get("image_size", 224)
    preprocess_cfg = config.get("preprocess_cfg", {})
    transform = open_clip.image_transform(
        image_size,
        is_train=False,
        mean=preprocess_cfg.get("mean"),
        std=preprocess_cfg.get("std"),
    )
    return transform, open_clip.get_tokenizer(model_name)
