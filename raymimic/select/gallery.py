"""A gallery of a filter's decisions: ``gallery.html`` with thumbnails from the pool, readable offline.

What the page shows. For the filter's score column, three rows of samples:

- ``dropped``: drawn from the lowest-scored dropped samples (the lowest ``band`` of them),
- ``borderline``: the samples nearest the decision threshold (or, without one, the cut of the
  kept fraction: the score quantile at ``1 - fraction kept``),
- ``kept``: drawn from the highest-scored kept samples (the highest ``band`` of them).

Each tile shows the thumbnail, the caption, the uid, the score and the decision (and, with a
ground truth, the kind of noise). A second view lists the same uids under every compared score
column (the reference, each control, each baseline) as a percentile of that column, marked kept
or dropped at the same kept fraction, so the reader sees where the columns disagree.

How it is made (kernels are plain pandas/numpy/PIL; executors only move data):

1. one pass over the decisions (a Ray Dataset; a pandas frame or a parquet file in this process) keeps, per
   block, the rows whose keyed hash of the uid (:func:`raymimic.data.uids.keyed_uniform`) is
   small, and the block's row and kept counts (:func:`sketch_block`); the driver keeps the
   ``sample_size`` smallest keys, a uniform sample that does not depend on the blocks;
2. :func:`pick_samples` draws the three rows from that sample, deterministically;
3. :func:`raymimic.data.shard_index.locate_uids` finds the shards holding the picked uids, and
   ``read_pool(pool, shards=...)`` reads only those, on the workers, where
   :func:`thumbnail_rows` keeps the picked samples and makes their thumbnails;
4. :func:`render_gallery` writes the page; thumbnails go to ``gallery_files/`` beside it (or are
   embedded) and the page is written last, so it appears only when complete.

A picked sample that cannot be shown (missing from the pool, a corrupt image, a rejected sample)
is a tile that says why, never a broken image.
"""
from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from raymimic.data.uids import keyed_uniform, uid_pairs

BANDS = ("dropped", "borderline", "kept")
BAND_TITLES = {
    "dropped": "Dropped: drawn from the lowest-scored",
    "borderline": "Borderline: nearest the cut",
    "kept": "Kept: drawn from the highest-scored",
}
SKETCH_KEY = "sketch_key"
_BLOCK_ROWS, _BLOCK_KEPT, _SAMPLED = "sketch_block_rows", "sketch_block_kept", "sketch_sampled"
THUMBNAIL_FOLDER = "gallery_files"
PAGE_NAME = "gallery.html"
LOCAL_SAMPLE_ROWS = 5_000_000
"""A filter's decisions.parquet up to this many rows is sampled in the driver, larger ones with Ray Data."""


# ----------------------------------------------------------------------------- kernels


def uid_keys(uids, seed: int) -> np.ndarray:
    """A seeded number in [0, 1) per uid, the same wherever the uid is."""
    hi, lo = uid_pairs(np.asarray(uids, dtype=str))
    return keyed_uniform(seed, hi, lo)


def sketch_block(batch: pd.DataFrame, columns: Sequence[str], keep_column: str, below: float, seed: int) -> pd.DataFrame:
    """The rows of ``batch`` whose uid key is below ``below`` (``uid``, ``keep_column``, ``columns``, the key),
    with the block's row and kept counts on its first row (so that blocks with no sampled row still count)."""
    keep = batch[keep_column].fillna(False).to_numpy(dtype=bool) if len(batch) else np.zeros(0, bool)
    keys = uid_keys(batch["uid"].to_numpy(), seed) if len(batch) else np.zeros(0)
    chosen = np.flatnonzero(keys < below)
    counted = np.concatenate([[0], chosen]) if len(batch) and (not len(chosen) or chosen[0] != 0) else chosen
    out = batch.iloc[counted][["uid", *columns]].reset_index(drop=True)
    out[keep_column] = keep[counted]
    out[SKETCH_KEY] = keys[counted]
    out[_BLOCK_ROWS] = np.zeros(len(out), np.int64)
    out[_BLOCK_KEPT] = np.zeros(len(out), np.int64)
    if len(out):
        out.loc[0, _BLOCK_ROWS], out.loc[0, _BLOCK_KEPT] = len(batch), int(keep.sum())
    # the counting row joins the sample only if its own key is below the cap
    out[_SAMPLED] = out[SKETCH_KEY].to_numpy() < below
    return out


def merge_sketches(sketch: pd.DataFrame, sample_size: int) -> tuple[pd.DataFrame, int, int]:
    """``(sample, n_rows, n_kept)``: the ``sample_size`` sampled rows of smallest key, and the totals."""
    if _BLOCK_ROWS not in sketch.columns:  # no block had a row
        return pd.DataFrame(), 0, 0
    n_rows, n_kept = int(sketch[_BLOCK_ROWS].sum()), int(sketch[_BLOCK_KEPT].sum())
    sampled = sketch[sketch[_SAMPLED].to_numpy(bool)].drop_duplicates("uid")
    sample = sampled.nsmallest(sample_size, SKETCH_KEY).drop(columns=[_BLOCK_ROWS, _BLOCK_KEPT, _SAMPLED])
    return sample.reset_index(drop=True), n_rows, n_kept


def _drawn(frame: pd.DataFrame, score_column: str, ascending: bool, per_row: int, band: float) -> pd.DataFrame:
    """``per_row`` rows drawn (smallest keys) from the ``band`` of ``frame`` lowest (or highest) in ``score_column``."""
    ranked = frame.sort_values([score_column, SKETCH_KEY], ascending=[ascending, True])
    pool = ranked.head(max(per_row, math.ceil(band * len(ranked))))
    return pool.nsmallest(per_row, SKETCH_KEY)


def pick_samples(sample: pd.DataFrame, score_column: str, keep_column: str, kept_fraction: float, per_row: int = 24,
                 threshold: float | None = None, band: float = 0.1) -> tuple[pd.DataFrame, float]:
    """``(picks, cut)``: the rows of the gallery (``sample``'s columns plus ``band``), ordered by band then score.

    ``dropped`` / ``kept``: ``per_row`` rows drawn by uid key from the lowest ``band`` of the dropped
    rows (the highest of the kept); ``borderline``: the ``per_row`` other rows nearest ``cut``, which is
    ``threshold`` or, without one, the score quantile at ``1 - kept_fraction``. Rows with no finite score
    are left out. Deterministic: a sample and its parameters give the same picks.
    """
    scores = sample[score_column].to_numpy(np.float64, na_value=np.nan)
    scored = sample[np.isfinite(scores)]
    keep = scored[keep_column].to_numpy(bool)
    if threshold is not None:
        cut = float(threshold)
    elif len(scored):
        cut = float(np.quantile(scored[score_column].to_numpy(np.float64), min(max(1 - kept_fraction, 0.0), 1.0)))
    else:
        cut = math.nan
    dropped = _drawn(scored[~keep], score_column, True, per_row, band)
    kept = _drawn(scored[keep], score_column, False, per_row, band)
    rest = scored[~scored["uid"].isin(pd.concat([dropped["uid"], kept["uid"]]))]
    distance = (rest[score_column].to_numpy(np.float64) - cut) if math.isfinite(cut) else np.zeros(len(rest))
    borderline = rest.assign(_distance=np.abs(distance)).nsmallest(per_row, ["_distance", SKETCH_KEY]).drop(columns="_distance")
    rows = [frame.sort_values([score_column, SKETCH_KEY]).assign(band=name)
            for name, frame in zip(BANDS, (dropped, borderline, kept))]
    return pd.concat(rows, ignore_index=True), cut


def column_percentiles(sample: pd.DataFrame, picks: pd.DataFrame, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Per column, each pick's percentile (0-100) among the sample's finite values of that column (NaN where it has none)."""
    out = {}
    for column in columns:
        values = np.sort(sample[column].to_numpy(np.float64, na_value=np.nan))
        values = values[np.isfinite(values)]
        picked = picks[column].to_numpy(np.float64, na_value=np.nan)
        ranks = np.searchsorted(values, picked, side="right") / max(len(values), 1) * 100
        out[column] = np.where(np.isfinite(picked) & (len(values) > 0), ranks, np.nan)
    return out


def thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG of at most ``size`` x ``size`` pixels (aspect kept) from encoded image bytes; raises on an undecodable image."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        small = image.convert("RGB")
        small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail_rows(batch: pd.DataFrame, uids: frozenset, size: int) -> pd.DataFrame:
    """The rows of a ``read_pool`` batch whose uid is picked: ``uid, text, shard, key, thumbnail`` (JPEG bytes or None)
    and ``problem`` (why there is no thumbnail, or None)."""
    rows = batch[batch["uid"].isin(uids)]
    thumbnails, problems = [], []
    for data in rows["image"]:
        try:
            thumbnails.append(thumbnail(data, size))
            problems.append(None)
        except Exception as error:  # PIL raises many types for bad data
            thumbnails.append(None)
            problems.append(f"undecodable image: {type(error).__name__}: {error}")
    return pd.DataFrame({"uid": rows["uid"].to_numpy(), "text": rows["text"].to_numpy(), "shard": rows["shard"].to_numpy(),
                         "key": rows["key"].to_numpy(), "thumbnail": pd.Series(thumbnails, dtype=object),
                         "problem": pd.Series(problems, dtype=object)})


def explain_missing(uids: Sequence[str], index: pd.DataFrame | None, rejects: pd.DataFrame) -> dict[str, str]:
    """Why each of ``uids`` (picked, not read) has no picture: the read's reject reason, or where it was not found."""
    reasons = {(r.shard, r.key): f"{r.reason}: {r.detail}" for r in rejects.itertuples()}
    located = {} if index is None else {r.uid: (r.shard, r.key) for r in index.itertuples()}
    out = {}
    for uid in uids:
        if uid in located:
            shard, key = located[uid]
            out[uid] = f"sample {key} of {shard} was not read: {reasons.get((shard, key), 'not in the shard')}"
        elif index is not None:
            out[uid] = "not in the pool: no shard table lists this uid"
        else:
            out[uid] = "not in the pool: no shard holds this uid"
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}nav a{margin-right:1em}
.row{display:flex;flex-wrap:wrap;gap:10px}
.tile{width:170px;margin:0;background:#fff;border:3px solid #ccc;border-radius:6px;padding:6px;font-size:12px}
.tile.keep{border-color:#2e8b57}.tile.drop{border-color:#c0392b}
.tile img,.tile .missing{display:block;width:160px;height:160px;object-fit:contain;background:#eee}
.missing-small{color:#900}.tile .missing{box-sizing:border-box;padding:8px;overflow:auto;color:#900;font-size:11px;white-space:normal}
.caption{margin:4px 0;max-height:4.5em;overflow:auto}.meta{margin:0;color:#555;word-break:break-all}
.decision{font-weight:bold}.keep .decision{color:#2e8b57}.drop .decision{color:#c0392b}.kind{color:#7a4b00}
table{border-collapse:collapse;font-size:12px;background:#fff}td,th{border:1px solid #ddd;padding:3px 6px;text-align:right}
td.k{background:#e3f4e8}td.d{background:#f8e0dd}td.left,th.left{text-align:left}tr.disagree td:first-child{border-left:4px solid #e67e22}
table img{width:48px;height:48px;object-fit:contain;vertical-align:middle}
"""


def _number(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _image_cell(source: str | None, problem: str | None, uid: str, big: bool = True) -> str:
    if source is not None:
        return f'<img src="{html.escape(source)}" alt="uid {html.escape(uid)}">'
    why = html.escape(problem or "no image")
    return f'<div class="missing" title="{why}">{why}</div>' if big else f'<span class="missing-small" title="{why}">no image</span>'


def render_gallery(picks: pd.DataFrame, images: dict[str, str], problems: dict[str, str], score_column: str, keep_column: str,
                   compare: dict[str, np.ndarray], kept_fraction: float, facts: dict, title: str) -> str:
    """The page: three rows of tiles (one per band) and the table of the same uids under every compared column.

    ``picks``: :func:`pick_samples`' rows (with ``text`` and, with a ground truth, ``kind``); ``images``: uid -> image
    source (a relative path or a data URI); ``problems``: uid -> why it has no image; ``compare``: column -> percentiles
    (:func:`column_percentiles`); ``facts``: name -> value, listed at the top.
    """
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{_STYLE}</style></head>",
             f"<body><h1>{e(title)}</h1>",
             "<nav><a href=\"#by-decision\">by decision</a><a href=\"#by-column\">same uids under every score column</a></nav>",
             "<p>" + "; ".join(f"{e(str(k))}: <b>{e(str(v))}</b>" for k, v in facts.items()) + "</p>",
             "<section id=\"by-decision\">"]
    has_kind = "kind" in picks.columns
    for band in BANDS:
        rows = picks[picks["band"] == band]
        parts.append(f"<h2>{e(BAND_TITLES[band])} ({len(rows)})</h2><div class=\"row\" data-band=\"{band}\">")
        if rows.empty:
            parts.append("<p>none: no sample falls here</p>")
        for row in rows.itertuples(index=False):
            row = row._asdict()
            uid, keep = row["uid"], bool(row[keep_column])
            decision = "keep" if keep else "drop"
            kind = f' <span class="kind">{e(str(row["kind"]))}</span>' if has_kind and isinstance(row.get("kind"), str) else ""
            text = row.get("text")
            caption = e(text) if isinstance(text, str) else "<i>caption not read</i>"
            parts.append(
                f'<figure class="tile {decision}" data-uid="{e(uid)}" data-decision="{decision}" data-band="{band}">'
                f"{_image_cell(images.get(uid), problems.get(uid), uid)}"
                f'<figcaption><p class="caption">{caption}</p><p class="meta"><code>{e(uid)}</code><br>'
                f'{e(score_column)} {_number(row[score_column])}<br><span class="decision">{"kept" if keep else "dropped"}</span>{kind}'
                "</p></figcaption></figure>")
        parts.append("</div>")
    parts.append("</section><section id=\"by-column\"><h2>The same uids under every score column</h2>")
    parts.append(f"<p>Each cell: the column's value and its percentile among a uniform sample of the decisions; green when that "
                 f"column would keep the uid at the same kept fraction ({kept_fraction:.3f}), red when it would drop it. "
                 "An orange edge marks a uid the columns disagree on.</p>")
    columns = list(compare)
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    parts.append(f"<table><tr><th class=\"left\">sample</th><th>band</th><th>decision</th>{head}</tr>")
    cut = 100 * (1 - kept_fraction)
    for i, row in enumerate(picks.itertuples(index=False)):
        row = row._asdict()
        uid = row["uid"]
        votes = [compare[c][i] > cut for c in columns if np.isfinite(compare[c][i])]
        disagree = len(set(votes)) > 1
        cells = []
        for c in columns:
            pct = compare[c][i]
            kind = "" if not np.isfinite(pct) else (' class="k"' if pct > cut else ' class="d"')
            cells.append(f"<td{kind}>{_number(row[c])}<br>{'n/a' if not np.isfinite(pct) else f'{pct:.0f}%'}</td>")
        parts.append(f'<tr class="{"disagree" if disagree else "agree"}" data-uid="{e(uid)}"><td class="left">'
                     f"{_image_cell(images.get(uid), problems.get(uid), uid, big=False)} <code>{e(uid[:12])}</code></td>"
                     f"<td>{row['band']}</td><td>{'kept' if row[keep_column] else 'dropped'}</td>{''.join(cells)}</tr>")
    parts.append("</table></section></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- executors


def sample_decisions(decisions, columns: Sequence[str], keep_column: str, sample_size: int = 20_000,
                     seed: int = 0) -> tuple[pd.DataFrame, int, int]:
    """``(sample, n_rows, n_kept)`` of decisions: a Ray Dataset (one Ray Data pass), a pandas frame, or the path of a
    parquet file (both in this process; the file streamed by batches).

    The sample: about ``sample_size`` rows, uniform, chosen by uid key, with ``uid``, ``keep_column``
    and ``columns``.
    """
    wanted = list(dict.fromkeys(["uid", keep_column, *columns]))
    if isinstance(decisions, str):
        from raymimic.select.output import read_decisions

        table = read_decisions(decisions)
        _check_columns(wanted, table.schema.names, decisions)
        below = _oversampled(sample_size, table.count_rows())
        sketch = pd.concat([sketch_block(batch.to_pandas(), list(columns), keep_column, below, seed)
                            for batch in table.to_batches(columns=wanted, batch_size=65_536)], ignore_index=True)
    elif isinstance(decisions, pd.DataFrame):
        _check_columns(wanted, list(decisions.columns), "the decisions")
        sketch = sketch_block(decisions, list(columns), keep_column, _oversampled(sample_size, len(decisions)), seed)
    else:
        _check_columns(wanted, decisions.schema().names, "the decisions")
        kwargs = {"columns": list(columns), "keep_column": keep_column, "below": _oversampled(sample_size, decisions.count()), "seed": seed}
        sketch = decisions.select_columns(wanted).map_batches(sketch_block, fn_kwargs=kwargs, batch_format="pandas",
                                                              batch_size=None).to_pandas()
    return merge_sketches(sketch, sample_size)


def _oversampled(sample_size: int, n_rows: int) -> float:
    """The key cap that keeps about four times ``sample_size`` of ``n_rows`` rows (the driver keeps the smallest keys)."""
    return min(1.0, 4 * sample_size / max(n_rows, 1))


def _check_columns(wanted: list[str], have: list[str], where: str) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise ValueError(f"{where} lack column(s) {missing} (have {have})")


def fetch_thumbnails(pool: str, uids: Sequence[str], size: int) -> tuple[pd.DataFrame, dict[str, str], dict]:
    """``(rows, problems, reading)``: :func:`thumbnail_rows` of the picked uids, read through Ray Data from only the
    shards that hold them; why the others have none; and what was read (``shards_read``; ``shard_index``: whether the
    pool's per-shard tables named the shards, or every shard was read)."""
    from raymimic.data.pool import PoolRejects, read_pool, shard_files
    from raymimic.data.shard_index import locate_uids

    index = locate_uids(pool, uids)
    shards = None if index is None else sorted(set(index["shard"]))
    reading = {"shards_read": None if shards is None else len(shards), "shard_index": index is not None}
    empty = thumbnail_rows(pd.DataFrame({c: [] for c in ("uid", "text", "shard", "key", "image")}), frozenset(), size)
    if shards == []:
        return empty, explain_missing(uids, index, pd.DataFrame(columns=["shard", "key", "reason", "detail"])), reading
    if shards is None:
        reading["shards_read"] = len(shard_files(pool))
    rejects = PoolRejects(print_summary=False)
    ds = read_pool(pool, columns=["uid", "text", "image", "key", "shard"], rejects=rejects, shards=shards)
    rows = ds.map_batches(thumbnail_rows, fn_kwargs={"uids": frozenset(uids), "size": size}, batch_format="pandas").to_pandas()
    rows = rows if len(rows) else empty
    rows = rows.drop_duplicates("uid")
    problems = dict(zip(rows["uid"], rows["problem"]))
    problems = {uid: why for uid, why in problems.items() if why is not None}
    unread = [uid for uid in uids if uid not in set(rows["uid"])]
    problems.update(explain_missing(unread, index, rejects.table().to_pandas()))
    return rows, problems, reading


def write_gallery(decisions, pool: str, output: str, *, score_column: str, keep_column: str = "keep",
                  threshold: float | None = None, compare_columns: Sequence[str] = (), truth: pd.DataFrame | None = None,
                  per_row: int = 24, band: float = 0.1, thumbnail_size: int = 160, sample_size: int = 20_000, seed: int = 0,
                  embed: bool = False, title: str | None = None) -> dict:
    """Write ``output/gallery.html`` (and ``output/gallery_files/``) for a filter's decisions; return what was done.

    ``decisions``: a Ray Dataset, a pandas frame or a parquet file's path, with ``uid``, ``score_column`` (higher = keep) and the boolean
    ``keep_column``, e.g. a stage's output with ``drop=False`` (``stage.score_column``, ``stage.keep_column``,
    ``stage.threshold``), a chain combined by ``keep_where``, or a filter's ``decisions.parquet``.
    ``compare_columns``: other score columns of ``decisions`` shown beside ``score_column`` in the second view.
    ``truth``: ``uid`` and ``is_noisy`` (and ``kind``): the tiles name the kind of noise. ``embed``: thumbnails as data
    URIs in the page instead of files. A Dataset is read twice (a count, then one pass): materialize a costly one first.
    Returns ``path``, ``tiles``, ``images`` (tiles with a picture), ``problems`` (uid -> why not), ``shards_read``,
    ``n_rows``, ``n_kept``, ``cut`` and ``seconds``.
    """
    import fsspec

    started = time.time()
    if per_row < 1 or not 0 < band <= 1 or thumbnail_size < 8 or sample_size < 1:
        raise ValueError(f"write_gallery: need per_row >= 1, band in (0, 1], thumbnail_size >= 8, sample_size >= 1 "
                         f"(got {per_row}, {band}, {thumbnail_size}, {sample_size})")
    columns = list(dict.fromkeys([score_column, *compare_columns]))
    sample, n_rows, n_kept = sample_decisions(decisions, columns, keep_column, sample_size, seed)
    if n_rows == 0:
        raise ValueError("the decisions are empty: no sample to show")
    kept_fraction = n_kept / n_rows
    picks, cut = pick_samples(sample, score_column, keep_column, kept_fraction, per_row, threshold, band)
    compare = column_percentiles(sample, picks, columns)
    uids = picks["uid"].tolist()
    rows, problems, reading = fetch_thumbnails(pool, uids, thumbnail_size) if uids else (None, {}, {"shards_read": 0})
    text = dict(zip(rows["uid"], rows["text"])) if rows is not None else {}
    picks["text"] = [text.get(uid) for uid in uids]
    if truth is not None:
        truth = truth.drop_duplicates("uid").set_index("uid")
        kinds = truth["kind"] if "kind" in truth.columns else truth["is_noisy"].map({True: "noisy", False: "clean"})
        picks["kind"] = [kinds.get(uid) if uid in kinds.index else "not in the ground truth" for uid in uids]
    root = output.rstrip("/")
    fs, folder = fsspec.core.url_to_fs(root)
    fs.makedirs(folder, exist_ok=True)
    images = {}
    for uid, data in ([] if rows is None else zip(rows["uid"], rows["thumbnail"])):
        if data is None:
            continue
        if embed:
            images[uid] = "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")
        else:
            fs.makedirs(f"{folder}/{THUMBNAIL_FOLDER}", exist_ok=True)
            with fs.open(f"{folder}/{THUMBNAIL_FOLDER}/{uid}.jpg", "wb") as f:
                f.write(data)
            images[uid] = f"{THUMBNAIL_FOLDER}/{uid}.jpg"
    facts = {"decisions": n_rows, "kept": f"{n_kept} ({100 * kept_fraction:.1f}%)", "score column": score_column,
             "cut": _number(cut) + (" (threshold)" if threshold is not None else f" (score quantile at {1 - kept_fraction:.3f})"),
             "sample": f"{len(sample)} uids, seed {seed}", "shards read": reading["shards_read"]}
    page = render_gallery(picks, images, problems, score_column, keep_column, compare, kept_fraction, facts,
                          title or f"Gallery of {score_column}")
    path = f"{root}/{PAGE_NAME}"
    with fs.open(f"{folder}/{PAGE_NAME}", "w", encoding="utf-8") as f:
        f.write(page)
    return {"path": path, "tiles": len(picks), "images": len(images), "problems": problems, "shards_read": reading["shards_read"],
            "n_rows": n_rows, "n_kept": n_kept, "cut": cut, "seconds": round(time.time() - started, 2)}


def write_filter_gallery(output: str, pool: str, ground_truth: str | None = None, **options) -> dict:
    """The gallery of a ``raymimic filter`` output folder: its ``decisions.parquet`` (sampled in the driver up to
    :data:`LOCAL_SAMPLE_ROWS` rows, with Ray Data above) on
    ``mimic_score`` and ``keep``, compared with every recorded score column (``step_z_<column>``) and, when a
    pool stage wrote one, ``clip_score``; written beside the report. ``ground_truth``: the parquet given to the
    filter (its ``kind`` column names the noise on the tiles). ``options`` go to :func:`write_gallery`."""
    import fsspec
    import ray

    from raymimic.select.output import read_decisions
    from raymimic.select.quality import LIFT_VALUE_PREFIX

    root = output.rstrip("/")
    path = f"{root}/decisions.parquet"
    table = read_decisions(path)
    names, n_rows = table.schema.names, table.count_rows()
    # the decisions are read back in this process when small: faster than Ray Data starts tasks
    decisions = path if n_rows <= LOCAL_SAMPLE_ROWS else ray.data.read_parquet(path)
    compare = [c for c in names if c.startswith(LIFT_VALUE_PREFIX)] + [c for c in ("clip_score",) if c in names]
    truth = None
    if ground_truth:
        with fsspec.open(ground_truth, "rb") as f:
            frame = pd.read_parquet(f)
        truth = frame[[c for c in ("uid", "is_noisy", "kind") if c in frame.columns]]
    return write_gallery(decisions, pool, root, score_column="mimic_score", keep_column="keep", compare_columns=compare, truth=truth,
                         title=f"Gallery of {root.rsplit('/', 1)[-1]}: mimic_score", **options)
