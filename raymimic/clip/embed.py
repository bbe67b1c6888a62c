"""One open_clip embedder: images and captions to L2-normalised features.

Used by the evaluation (:mod:`raymimic.evaluate`: zero-shot classes, retrieval) and by the
CLIPScore teacher (:class:`raymimic.select.filters.CLIPScoreFilter` with ``model=``), each
inside a Ray Data actor that builds it once.

Images are given per row as encoded bytes or H x W x 3 uint8 pixels (decoded with
:func:`raymimic.data.preprocess.decode_image` and the model's eval transform), or as float
C x H x W arrays that are already preprocessed. Captions are strings (tokenized here) or
token-id arrays.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ClipEmbedder:
    """An open_clip model in eval mode with its transform and tokenizer; every method runs without gradient."""

    def __init__(self, model: torch.nn.Module, tokenizer, preprocess=None, device: str | torch.device = "cpu"):
        """Embed with ``model`` (already on ``device``; put in eval mode); ``preprocess``: its eval image transform
        (needed only for images that are not preprocessed yet)."""
        self.device = device
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    @classmethod
    def load(cls, model: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipEmbedder:
        """The open_clip model ``model`` with ``pretrained`` weights (tag, path or URI; None = random init) on ``device``."""
        from raymimic.clip.models import create_model, get_tokenizer

        module, _, preprocess = create_model(model, pretrained=pretrained, device=device)
        return cls(module, get_tokenizer(model), preprocess, device)

    def image_tensor(self, images: Sequence) -> torch.Tensor:
        """The model's input batch (N x C x H x W, on the device) for a sequence of images."""
        from raymimic.data.preprocess import decode_image

        rows = []
        for value in images:
            if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
                rows.append(torch.tensor(value, dtype=torch.float32))  # already preprocessed (a copy: Ray hands read-only arrays)
            elif self.preprocess is None:
                raise ValueError("this embedder has no image transform: give preprocessed float C x H x W images")
            else:
                rows.append(self.preprocess(decode_image(value)))
        return torch.stack(rows).to(self.device)

    def embed_images(self, images: Sequence) -> torch.Tensor:
        """Normalised image features, N x D."""
        with torch.no_grad():
            return self.model.encode_image(self.image_tensor(images), normalize=True)

    def embed_texts(self, texts: Sequence) -> torch.Tensor:
        """Normalised text features, N x D, of captions (str) or token-id arrays."""
        texts = list(texts)
        tokens = self.tokenizer([str(t) for t in texts]) if isinstance(texts[0], str) else torch.as_tensor(np.stack(texts))
        with torch.no_grad():
            return self.model.encode_text(tokens.to(self.device), normalize=True)

    def embed_classes(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Zero-shot class embeddings, C x D: the normalised mean of each class's normalised template captions."""
        rows = []
        for name in classnames:
            emb = self.embed_texts([t.format(name) for t in templates]).mean(0)
            rows.append(emb / emb.norm())
        return torch.stack(rows)
