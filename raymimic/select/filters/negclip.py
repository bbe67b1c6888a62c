"""negCLIPLoss (arXiv 2405.19547): CLIPScore(i) - R(i) against a seeded bank of negatives drawn from the whole pool."""
from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd

from raymimic.data.uids import GOLDEN_GAMMA, mix64, unit_interval
from raymimic.select.filters.common import (
    DeviceStates,
    StreamedScoreFilter,
    chunk_sizes,
    embedding_matrix,
    normalize_rows,
    resolve_state,
    similarities,
    task_device,
)

log = logging.getLogger(__name__)


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
    img = normalize_rows(image_embeddings.astype(np.float64))
    txt = normalize_rows(text_embeddings.astype(np.float64))
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
        img, txt = embedding_matrix(batch, image_column), embedding_matrix(batch, text_column)
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
    img = normalize_rows(embedding_matrix(batch.iloc[unique], image_column)).astype(dtype)[inverse] if len(unique) else out["img"]
    txt = normalize_rows(embedding_matrix(batch.iloc[unique], text_column)).astype(dtype)[inverse] if len(unique) else out["txt"]
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

    return {"img": merged["img"], "txt": merged["txt"], "hash": hashes, "sorted_hash": np.take_along_axis(hashes, order, 1), "order": order,
            "batch_size": int(batch_size), "pool_rows": int(seen), "whole_pool": bool(seen <= batch_size), "seed": int(seed),
            "token": uuid.uuid4().hex}


def _lse_rows(s):
    """Row-wise log-sum-exp of a float32 matrix, in place (``s`` is overwritten); -inf where a row is all -inf."""
    import torch

    m = s.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return s.sub_(m).exp_().sum(dim=1).log_().add_(m[:, 0])


def neg_clip_loss_banked(image_embeddings: np.ndarray, text_embeddings: np.ndarray, hashes: np.ndarray, bank: dict, tau: float = 0.01,
                         chunk_rows: int | None = None, chunk_bank: int | None = None, device: str = "cpu",
                         device_states: DeviceStates | None = None) -> np.ndarray:
    """negCLIPLoss(i) = CLIPScore(i) - R(i) with batch k of row i = {i} + B - 1 rows of the pool's bank k.

    ``bank`` from :func:`draw_negative_bank` (B = its ``batch_size``; bank k = B rows sorted by key k);
    ``hashes``: :func:`row_hashes` of the rows. The negatives of row i in repetition k are bank k without i
    when i is in it, else bank k's first B - 1 rows; each is a uniform random (B - 1)-subset of the pool
    without i, as in the paper (see :class:`NegCLIPLossFilter`). A pool of at most B rows: the negatives
    are the whole pool without i.

    Memory is bounded by the chunks, not by B: a ``chunk_rows x chunk_bank`` float32 similarity block at a
    time, log-sum-exps combined across chunks in float64. Rows are padded to whole chunks so that each
    row's score does not depend on which other rows share its block (identical on CPU for any layout).
    Chunk sizes default by device (:func:`chunk_sizes`); results stay on the device until the end (one copy
    to the host per call). The bank's device copy is held by ``device_states`` (its owner's, e.g. a stage actor's),
    else by this call alone.
    """
    import torch

    n = len(image_embeddings)
    if n == 0:
        return np.zeros(0)
    if tau <= 0:
        raise ValueError(f"negCLIPLoss needs tau > 0, got {tau}")
    img = normalize_rows(np.asarray(image_embeddings, dtype=np.float32))
    txt = normalize_rows(np.asarray(text_embeddings, dtype=np.float32))
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
    tensors = (DeviceStates() if device_states is None else device_states).tensors(bank, ("img", "txt"), device)
    bank_img, bank_txt = tensors["img"], tensors["txt"]
    chunk_rows, chunk_bank = chunk_sizes("negclip", device, chunk_rows, chunk_bank)
    r = torch.zeros(n, dtype=torch.float64, device=device)
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
                s_img = similarities(x, bank_txt[k, c0:c1])  # image i vs the bank's texts: s_ij / tau
                s_txt = similarities(y, bank_img[k, c0:c1])  # text i vs the bank's images: s_ji / tau
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
            r[r0:r0 + count] += torch.logaddexp(lse_img, own) + torch.logaddexp(lse_txt, own)
    return clip - tau * r.cpu().numpy() / (2 * n_banks)


def _bank_candidates_frame(batch: pd.DataFrame, **kwargs) -> pd.DataFrame:
    """Ray Data wrapper of :func:`bank_candidates`: one row holding the candidates as .npz bytes."""
    part = bank_candidates(batch, **kwargs)
    buffer = io.BytesIO()
    np.savez(buffer, **part)
    return pd.DataFrame({"candidates": [buffer.getvalue()]})


def negclip_score_frame(batch: pd.DataFrame, bank, score_column: str, image_column: str, text_column: str, key_column: str | None,
                         tau: float, chunk_rows: int, chunk_bank: int, num_gpus: float,
                         device_states: DeviceStates | None = None) -> pd.DataFrame:
    bank = resolve_state(bank)
    if len(batch):
        hashes = row_hashes(batch, bank["seed"], key_column, image_column, text_column)
        scores = neg_clip_loss_banked(embedding_matrix(batch, image_column), embedding_matrix(batch, text_column), hashes, bank, tau,
                                      chunk_rows, chunk_bank, task_device(num_gpus), device_states)
    else:
        scores = np.zeros(0)
    batch[score_column] = scores
    return batch


class NegCLIPLossFilter(StreamedScoreFilter):
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
                 key_column: str | None = "uid", bank_dtype: str = "float16", num_gpus: float = 0, chunk_rows: int | None = None,
                 chunk_bank: int | None = None, drop: bool = True):
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
        return negclip_score_frame, self._bank_ref, {"score_column": self.score_column, "image_column": self.image_column,
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
        return negclip_score_frame(batch.copy(), self.bank, "s", self.image_column, self.text_column, self.key_column, self.tau,
                                    self.chunk_rows, self.chunk_bank, self.num_gpus)["s"].to_numpy()

    def params(self) -> dict:
        bank = None if self.bank is None else {"pool_rows": self.bank["pool_rows"], "n_banks": int(self.bank["hash"].shape[0]),
                                               "bank_rows": int(self.bank["hash"].shape[1]), "whole_pool": self.bank["whole_pool"]}
        return {**super().params(), "batch_size": self.batch_size, "k": self.k, "tau": self.tau, "seed": self.seed,
                "image_column": self.image_column, "text_column": self.text_column, "key_column": self.key_column,
                "bank_dtype": self.bank_dtype, "bank": bank}
