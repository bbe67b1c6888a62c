"""Gallery benchmark: ``raymimic filter --gallery``'s page after the filter, against a full scan of the pool.

    python benchmarks/gallery.py --samples 6000 --shard-size 500 --repeats 3 --json out.json

Writes a toy pool (``--samples`` samples, 30% noisy captions, ``--shard-size`` samples per shard), a
score table for its uids (``score`` separating the noisy samples with overlap, ``score_zero`` noise,
2 epochs), runs the Stage-2 filter on it with the pool (GMM; timed once, as context), then, on the
same warm local Ray, times ``--repeats`` times in turn:

- ``gallery``: :func:`raymimic.select.gallery.write_filter_gallery` on the filter's output, the whole
  page of 3 x 24 tiles (sample of the decisions, picks, shard lookup, images read from only the
  shards that hold the picked uids, thumbnails, page);
- ``baseline``: the same picked uids' thumbnails made by scanning every shard of the pool with
  ``read_pool`` (what a gallery without the shard lookup would read).

Wall time and CPU time (user + system of the driver and every process under it, Ray's included)
are reported per run, with their medians and the gallery/baseline ratios, the number of shards the
gallery read and the pool's shard count. The 1-minute load average before and after is printed:
on a shared machine it says how much the figures are worth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import pandas as pd


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live process under it, read from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent, seconds = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name: state, ppid, ...
        except OSError:
            continue
        parent[int(entry)], seconds[int(entry)] = int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        children = [pid for pid, ppid in parent.items() if ppid in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    return sum(seconds.get(pid, 0.0) for pid in tree)


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), tree_cpu_seconds()
    result = fn()
    return result, time.perf_counter() - wall, tree_cpu_seconds() - cpu




def full_scan(pool: str, uids: list[str], size: int) -> int:
    """The baseline: thumbnails of ``uids`` read by scanning every shard of the pool; returns how many were made."""
    from raymimic.data.pool import PoolRejects, read_pool
    from raymimic.select.gallery import thumbnail_rows

    ds = read_pool(pool, columns=["uid", "text", "image", "key", "shard"], rejects=PoolRejects(print_summary=False))
    return len(ds.map_batches(thumbnail_rows, fn_kwargs={"uids": frozenset(uids), "size": size}, batch_format="pandas").to_pandas())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=6000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument("--workdir", help="where the pool and the outputs go (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from raymimic.data.pool import shard_files
    from raymimic.select.gallery import THUMBNAIL_FOLDER, write_filter_gallery
    from raymimic.select.pipeline import FilterConfig, run_filter
    from raymimic_experiments.toy_pool import make_toy_pool, toy_score_table

    work = args.workdir or tempfile.mkdtemp(prefix="raymimic-gallery-bench-")
    pool, scores, out = f"{work}/pool", f"{work}/scores", f"{work}/filter"
    load_before = os.getloadavg()[0]
    make_toy_pool(pool, samples=args.samples, noise=0.3, seed=0, shard_size=args.shard_size, eval_samples=0, workers=1)
    truth = pd.read_parquet(f"{pool}/ground_truth.parquet")
    os.makedirs(scores, exist_ok=True)
    toy_score_table(truth["uid"].to_numpy(), truth["is_noisy"].to_numpy(bool), batch=100).to_parquet(f"{scores}/00000.parquet", index=False)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    truth_path = f"{pool}/ground_truth.parquet"
    _, filter_wall, filter_cpu = timed(lambda: run_filter(FilterConfig(scores, out, pool=pool, ground_truth=truth_path)))
    runs = []
    for repeat in range(args.repeats):
        gallery, wall, cpu = timed(lambda: write_filter_gallery(out, pool, truth_path))
        uids = [p.name[: -len(".jpg")] for p in os.scandir(f"{out}/{THUMBNAIL_FOLDER}")]
        made, base_wall, base_cpu = timed(lambda uids=uids: full_scan(pool, uids, 160))
        runs.append({"repeat": repeat, "gallery_wall_s": wall, "gallery_cpu_s": cpu, "baseline_wall_s": base_wall,
                     "baseline_cpu_s": base_cpu, "tiles": gallery["tiles"], "images": gallery["images"],
                     "shards_read": gallery["shards_read"], "baseline_images": made})
        print(f"repeat {repeat}: gallery {wall:.2f} s wall, {cpu:.2f} s CPU ({gallery['tiles']} tiles, {gallery['images']} images, "
              f"{gallery['shards_read']} shards read); full scan {base_wall:.2f} s wall, {base_cpu:.2f} s CPU ({made} images)", flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in ("gallery_wall_s", "gallery_cpu_s", "baseline_wall_s", "baseline_cpu_s")}
    result = {
        "samples": args.samples, "shards": len(shard_files(pool)), "shard_size": args.shard_size, "num_cpus": args.num_cpus,
        "cores": os.cpu_count(), "filter_wall_s": filter_wall, "filter_cpu_s": filter_cpu, "runs": runs, "median": median,
        "ratio_wall": median["gallery_wall_s"] / median["baseline_wall_s"], "ratio_cpu": median["gallery_cpu_s"] / median["baseline_cpu_s"],
        "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
    }
    print(f"{args.samples} samples in {result['shards']} shards on {os.cpu_count()} cores; the filter took {filter_wall:.1f} s "
          f"({filter_cpu:.1f} s CPU)")
    print(f"median gallery {median['gallery_wall_s']:.2f} s wall / {median['gallery_cpu_s']:.2f} s CPU; full-scan baseline "
          f"{median['baseline_wall_s']:.2f} s / {median['baseline_cpu_s']:.2f} s; gallery/baseline {result['ratio_wall']:.2f}x wall, "
          f"{result['ratio_cpu']:.2f}x CPU; load average {load_before:.1f} -> {result['load_average_after']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
