"""The sample gallery: picking kernels, `raymimic filter --gallery`, the report's pictures, corrupt and
missing samples, a constant column, a chain of filter stages, and the page opened in headless Chromium."""
from __future__ import annotations

import html
import io
import json
import re
import shutil
import subprocess
import tarfile

import numpy as np
import pandas as pd
import pytest

from raymimic.select.gallery import BANDS, merge_sketches, pick_samples, sketch_block
from raymimic_experiments.toy_pool import toy_score_table

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
PER_ROW = 24


def decisions_frame(n: int = 5000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    score = rng.standard_normal(n)
    return pd.DataFrame({"uid": [f"{i:032x}" for i in range(n)], "score": score, "other": -score + rng.standard_normal(n),
                         "keep": score + 0.3 * rng.standard_normal(n) > 0})


def sketch(frame: pd.DataFrame, blocks: int, sample_size: int, columns=("score", "other")) -> tuple[pd.DataFrame, int, int]:
    below = min(1.0, 4 * sample_size / len(frame))
    parts = [sketch_block(frame.iloc[rows], list(columns), "keep", below, 0) for rows in np.array_split(np.arange(len(frame)), blocks)]
    return merge_sketches(pd.concat(parts, ignore_index=True), sample_size)


# ----------------------------------------------------------------------------- kernels


def test_the_sample_does_not_depend_on_the_blocks_and_counts_every_row():
    frame = decisions_frame()
    one, n_one, kept_one = sketch(frame, 1, 1000)
    many, n_many, kept_many = sketch(frame, 7, 1000)
    pd.testing.assert_frame_equal(one, many)
    assert (n_one, kept_one) == (n_many, kept_many) == (5000, int(frame["keep"].sum()))
    assert len(one) == 1000 and one["uid"].is_unique


def test_picks_fall_in_their_bands_and_are_deterministic():
    frame = decisions_frame()
    sample, n, n_kept = sketch(frame, 3, 4000)
    picks, cut = pick_samples(sample, "score", "keep", n_kept / n, per_row=PER_ROW)
    again, _ = pick_samples(sample, "score", "keep", n_kept / n, per_row=PER_ROW)
    pd.testing.assert_frame_equal(picks, again)
    assert picks["band"].value_counts().to_dict() == {band: PER_ROW for band in BANDS} and picks["uid"].is_unique
    assert cut == pytest.approx(np.quantile(sample["score"], 1 - n_kept / n))
    dropped, kept = sample[~sample["keep"]], sample[sample["keep"]]
    low = picks[picks["band"] == "dropped"]
    high = picks[picks["band"] == "kept"]
    assert not low["keep"].any() and high["keep"].all()
    # drawn from the lowest (highest) tenth of the dropped (kept) samples, not merely their extremes
    assert low["score"].max() <= np.quantile(dropped["score"], 0.1) and high["score"].min() >= np.quantile(kept["score"], 0.9)
    assert low["score"].min() > dropped["score"].min() or high["score"].max() < kept["score"].max()
    border = picks[picks["band"] == "borderline"]
    others = sample[~sample["uid"].isin(picks["uid"])]
    assert np.abs(border["score"] - cut).max() <= np.abs(others["score"] - cut).min()
    # an explicit threshold moves the borderline row there
    at_one, cut_one = pick_samples(sample, "score", "keep", n_kept / n, per_row=PER_ROW, threshold=1.0)
    assert cut_one == 1.0 and np.abs(at_one.loc[at_one["band"] == "borderline", "score"] - 1.0).max() < 0.1


def test_a_constant_column_still_gives_three_rows():
    frame = decisions_frame().assign(score=0.5)
    sample, n, n_kept = sketch(frame, 2, 2000)
    picks, cut = pick_samples(sample, "score", "keep", n_kept / n, per_row=5)
    assert cut == 0.5 and picks["band"].value_counts().to_dict() == {band: 5 for band in BANDS}
    assert not picks.loc[picks["band"] == "dropped", "keep"].any() and picks.loc[picks["band"] == "kept", "keep"].all()


def test_bad_decisions_are_refused_before_any_read(tmp_path):
    from raymimic.select.gallery import write_gallery

    frame = decisions_frame(50)
    with pytest.raises(ValueError, match=r"lack column\(s\) \['missing'\]"):
        write_gallery(frame, str(tmp_path / "no-pool"), str(tmp_path / "out"), score_column="missing")
    with pytest.raises(ValueError, match="the decisions are empty"):
        write_gallery(frame.iloc[:0], str(tmp_path / "no-pool"), str(tmp_path / "out"), score_column="score")
    with pytest.raises(ValueError, match="per_row >= 1"):
        write_gallery(frame, str(tmp_path / "no-pool"), str(tmp_path / "out"), score_column="score", per_row=0)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- pools and runs




@pytest.fixture(scope="module")
def toy_pool(tmp_path_factory):
    from raymimic_experiments.toy_pool import make_toy_pool

    root = tmp_path_factory.mktemp("gallery-pool") / "pool"
    make_toy_pool(str(root), samples=600, noise=0.3, seed=0, shard_size=50, eval_samples=0, workers=1)
    return root


@pytest.fixture(scope="module")
def filtered(ray_session, toy_pool, tmp_path_factory):
    """``raymimic filter --pool --gallery --report --ground-truth`` on the toy pool: the output folder."""
    from raymimic.app.cli import main

    root = tmp_path_factory.mktemp("gallery-run")
    truth = pd.read_parquet(toy_pool / "ground_truth.parquet")
    (root / "scores").mkdir()
    toy_score_table(truth["uid"].to_numpy(), truth["is_noisy"].to_numpy(bool)).to_parquet(root / "scores" / "00000.parquet", index=False)
    out = root / "out"
    argv = ["filter", "--scores", str(root / "scores"), "--pool", str(toy_pool), "--output", str(out), "--method", "gmm",
            "--ground-truth", str(toy_pool / "ground_truth.parquet"), "--report", "--gallery"]
    assert main(argv) == 0
    return out


def tiles_of(page: str) -> list[dict]:
    return [dict(zip(("uid", "decision", "band"), m)) | {"image": "<img" in body}
            for *m, body in re.findall(r'<figure class="tile \w+" data-uid="(\w+)" data-decision="(\w+)" data-band="(\w+)">(.*?)</figure>',
                                       page, flags=re.S)]


@pytest.mark.ray
def test_filter_gallery_shows_every_band_with_the_decisions_of_the_filter(filtered, toy_pool):
    page = (filtered / "gallery.html").read_text()
    summary = json.loads((filtered / "summary.json").read_text())
    decisions = pd.read_parquet(filtered / "decisions.parquet").set_index("uid")
    truth = pd.read_parquet(toy_pool / "ground_truth.parquet").set_index("uid")
    tiles = tiles_of(page)
    assert len(tiles) == 3 * PER_ROW and [t["band"] for t in tiles] == [b for b in BANDS for _ in range(PER_ROW)]
    assert all(t["decision"] == ("keep" if decisions.loc[t["uid"], "keep"] else "drop") for t in tiles)
    assert all(t["image"] for t in tiles) and len(list((filtered / "gallery_files").glob("*.jpg"))) == 3 * PER_ROW
    dropped = [t["uid"] for t in tiles if t["band"] == "dropped"]
    assert decisions.loc[dropped, "mimic_score"].max() < decisions["mimic_score"].quantile(0.3)
    # the caption comes from the shard, the kind of noise from the ground truth
    some = tiles[0]["uid"]
    assert html.escape(truth.loc[some, "text"]) in page and f'<span class="kind">{truth.loc[some, "kind"]}</span>' in page
    # the second view: the same uids under every recorded score column
    for column in ("mimic_score", "step_z_score", "step_z_score_zero"):
        assert f"<th>{column}</th>" in page
    assert page.count('<tr class="agree"') + page.count('<tr class="disagree"') == 3 * PER_ROW
    gallery = summary["gallery"]
    assert summary["files"]["gallery.html"].endswith("gallery.html") and gallery["tiles"] == 3 * PER_ROW and gallery["problems"] == 0
    assert 1 <= gallery["shards_read"] <= 12
    report = (filtered / "report.md").read_text()
    assert "[gallery.html](gallery.html)" in report and "](lift_roc.png)" in report and (filtered / "lift_roc.png").stat().st_size > 10_000


@pytest.mark.ray
def test_report_draws_a_rank_correlation_heatmap_without_ground_truth(filtered, tmp_path):
    from raymimic.select.figures import HEATMAP_PNG, lift_figure_lines

    summary = json.loads((filtered / "summary.json").read_text())
    summary["lift"]["ground_truth"] = False
    summary["files"].pop("gallery.html")
    assert lift_figure_lines(str(tmp_path), summary) == []  # no decisions.parquet beside the summary: no pictures
    shutil.copy(filtered / "decisions.parquet", tmp_path / "decisions.parquet")
    lines = lift_figure_lines(str(tmp_path), summary)
    assert not any("gallery.html" in line for line in lines) and lines[-1].endswith(f"({HEATMAP_PNG})")
    assert "600 uids; no ground truth" in lines[-1] and (tmp_path / HEATMAP_PNG).stat().st_size > 10_000


def _corrupt(pool, uid: str) -> None:
    """Replace the image bytes of ``uid``'s sample in its shard by bytes that are no image."""
    for table in sorted((pool / "shards").glob("*.parquet")):
        index = pd.read_parquet(table, columns=["uid", "key"])
        if uid in set(index["uid"]):
            key = index.loc[index["uid"] == uid, "key"].iloc[0]
            shard = table.with_suffix(".tar")
            with tarfile.open(shard) as tar:
                members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
            with tarfile.open(shard, "w") as tar:
                for member, data in members:
                    if member.name == f"{key}.jpg":
                        data = b"these bytes are not an image"
                        member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
            return
    raise AssertionError(f"uid {uid} is in no shard table")


@pytest.mark.ray
def test_corrupt_and_missing_samples_are_tiles_that_say_why(ray_session, toy_pool, tmp_path):
    from raymimic.select.gallery import write_gallery

    pool = tmp_path / "pool"
    shutil.copytree(toy_pool, pool)
    truth = pd.read_parquet(pool / "ground_truth.parquet")
    rng = np.random.default_rng(3)
    decisions = pd.DataFrame({"uid": truth["uid"], "score": rng.standard_normal(len(truth))})
    corrupt, absent = decisions["uid"].iloc[7], "f" * 32
    decisions.loc[7, "score"] = -50.0  # the lowest dropped sample, and a uid the pool does not hold
    decisions = pd.concat([decisions, pd.DataFrame({"uid": [absent], "score": [60.0]})], ignore_index=True)
    decisions["keep"] = decisions["score"] > 0
    _corrupt(pool, corrupt)
    out = write_gallery(decisions, str(pool), str(tmp_path / "out"), score_column="score", per_row=3, band=0.001, seed=1)
    assert set(out["problems"]) == {corrupt, absent} and out["tiles"] == 9 and out["images"] == 7
    assert out["problems"][corrupt].startswith("sample ") and "corrupt_image" in out["problems"][corrupt]
    assert out["problems"][absent] == "not in the pool: no shard table lists this uid"
    tiles = {t["uid"]: t for t in tiles_of((tmp_path / "out" / "gallery.html").read_text())}
    assert not tiles[corrupt]["image"] and not tiles[absent]["image"] and sum(t["image"] for t in tiles.values()) == 7
    page = (tmp_path / "out" / "gallery.html").read_text()
    assert "corrupt_image" in page and "no shard table lists this uid" in page


@pytest.mark.ray
def test_gallery_after_a_chain_of_stages_on_a_constant_column(ray_session, toy_pool, tmp_path):
    """CLIPScore then the basic rules, combined by keep_where; the page on CLIPScore, and on a constant column."""
    from raymimic.data.metadata import read_metadata
    from raymimic.select import BasicFilter, CLIPScoreFilter, keep_where
    from raymimic.select.gallery import write_gallery

    clip = CLIPScoreFilter(top_fraction=0.5, drop=False)
    basic = BasicFilter(language_model=False, min_size=0, drop=False)
    ds = read_metadata(str(toy_pool), columns=["text", "original_width", "original_height", "clip_l14_similarity_score"])
    ds = keep_where(basic.fit_apply(clip.fit_apply(ds)), [clip.keep_column, basic.keep_column]).materialize()
    out = write_gallery(ds, str(toy_pool), str(tmp_path / "clip"), score_column=clip.score_column, threshold=clip.threshold, per_row=4,
                        compare_columns=["clip_l14_similarity_score"], embed=True)
    frame = ds.to_pandas().set_index("uid")
    tiles = tiles_of((tmp_path / "clip" / "gallery.html").read_text())
    assert out["tiles"] == len(tiles) == 12 and out["images"] == 12 and not (tmp_path / "clip" / "gallery_files").exists()
    assert all(t["decision"] == ("keep" if frame.loc[t["uid"], "keep"] else "drop") for t in tiles)
    assert out["cut"] == clip.threshold and out["n_kept"] == int(frame["keep"].sum())
    constant = write_gallery(ds.to_pandas().assign(flat=1.0), str(toy_pool), str(tmp_path / "flat"), score_column="flat", per_row=4)
    assert constant["tiles"] == 12 and constant["cut"] == 1.0 and not constant["problems"]


# ----------------------------------------------------------------------------- in a browser

_CHECK_SCRIPT = """<script>
window.galleryErrors = [];
window.addEventListener("error", function (event) {
  var t = event.target;
  var what = t && t.tagName ? "failed to load " + t.tagName + " " + (t.currentSrc || t.src || t.href) : String(event.message);
  window.galleryErrors.push(what);
}, true);
var consoleError = console.error;
console.error = function () {
  window.galleryErrors.push(Array.prototype.join.call(arguments, " "));
  consoleError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var report = {
    images: Array.prototype.map.call(document.images, function (i) { return [i.getAttribute("src"), i.complete ? i.naturalWidth : 0]; }),
    tiles: Array.prototype.map.call(document.querySelectorAll("figure.tile"), function (t) {
      return [t.dataset.uid, t.dataset.decision, t.querySelector("img") !== null]; }),
    errors: window.galleryErrors
  };
  var out = document.createElement("pre");
  out.id = "gallery-check";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>"""


def browser() -> str:
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found is None:
        pytest.skip(f"no headless browser found (looked for {', '.join(BROWSERS)}); .ci/run installs Debian's chromium")
    return found


def open_in_browser(page, tmp_path) -> tuple[dict, list[str]]:
    """Load ``page`` in headless Chromium with a checking script placed first in its head (a copy beside it, so relative
    paths resolve); return what the script saw and the console lines Chromium logged; keep a screenshot in ``tmp_path``."""
    checked = page.with_name("gallery-checked.html")
    checked.write_text(page.read_text().replace("<head>", "<head>" + _CHECK_SCRIPT, 1))
    common = [browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
              "--virtual-time-budget=15000"]
    done = subprocess.run([*common, "--enable-logging=stderr", "--v=0", "--dump-dom", checked.as_uri()], capture_output=True, text=True,
                          timeout=120, check=True)
    found = re.search(r'<pre id="gallery-check">(.*?)</pre>', done.stdout, flags=re.S)
    assert found, f"the page never finished loading:\n{done.stderr[-3000:]}"
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    subprocess.run([*common, "--hide-scrollbars", "--window-size=1280,1800", f"--screenshot={tmp_path / 'gallery.png'}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return json.loads(html.unescape(found.group(1))), console


@pytest.mark.ray
def test_the_page_opens_in_a_real_browser_with_every_image_shown(filtered, tmp_path):
    seen, console = open_in_browser(filtered / "gallery.html", tmp_path)
    decisions = pd.read_parquet(filtered / "decisions.parquet").set_index("uid")
    assert seen["errors"] == [] and console == []
    assert len(seen["images"]) == 2 * 3 * PER_ROW and all(width > 0 for _, width in seen["images"])  # tiles and the column view
    assert len(seen["tiles"]) == 3 * PER_ROW and all(has_image for *_, has_image in seen["tiles"])
    assert [d for _, d, _ in seen["tiles"]] == ["keep" if decisions.loc[u, "keep"] else "drop" for u, _, _ in seen["tiles"]]
    assert (tmp_path / "gallery.png").stat().st_size > 50_000
