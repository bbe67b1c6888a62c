"""Stage 2 benchmark: the Ray mimic filter (``run_filter``) vs a hand-written single-process pass.

    python benchmarks/stage2_filter.py --rows 1000000 2000000 --json out.json

For each row count it generates a bimodal score table (parquet files of 250,000 rows, 2 epochs
or ``--epochs``, global batch 1024, 30% low-value samples, drifting scale, heavy-tailed weights),
then times in separate processes (so that peak memory is clean):

- ``ray``: ``raymimic.select.pipeline.run_filter`` (GMM, default parameters) on a local Ray
  instance, writing keep.npy / decisions.parquet / summary.json (the time starts after ``ray.init``);
- ``baseline``: pyarrow reads every file into memory, numpy computes per-step z-scores,
  scikit-learn fits the same GMM on the same sample size, pandas groups per uid, and
  ``raymimic.data.uids.write_subset`` writes keep.npy. It holds the whole table in memory, so it
  is skipped above ``--baseline-max-rows``.

Peak memory is the largest summed RSS of the process tree (driver, raylet, workers) sampled
every 0.1 s; shared object-store pages can be counted in several processes, so the Ray
figure is an upper bound. It reports rows/s, the Ray/baseline ratios, F1 of the dropped set
against the generated truth, and how time and memory grow with rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

BATCH = 1024
NOISE = 0.3


def generate(rows: int, directory: str, epochs: int = 2, rows_per_file: int = 250_000, seed: int = 0) -> None:
    """``rows`` score rows over ``rows // epochs`` uids, written one file slice at a time (memory: a few arrays of one epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raymimic.data.uids import pairs_to_hex

    rng = np.random.default_rng(seed)
    n_uids = rows // epochs
    noisy = rng.random(n_uids) < NOISE
    uid_hi = rng.integers(0, 2**63, n_uids, dtype=np.int64)
    # the low word is the uid's index: the truth of a decision is noisy[lo]
    uids = pairs_to_hex(uid_hi.astype(np.uint64), np.arange(n_uids, dtype=np.uint64))
    steps_per_epoch = n_uids // BATCH
    scales = np.geomspace(5.0, 0.05, epochs * steps_per_epoch)
    os.makedirs(directory, exist_ok=True)
    part = 0
    for epoch in range(epochs):
        idx = rng.permutation(n_uids)[: steps_per_epoch * BATCH]
        step = epoch * steps_per_epoch + np.repeat(np.arange(steps_per_epoch), BATCH)
        score = (np.where(noisy[idx], -1.0, 1.0) + 0.45 * rng.standard_normal(len(idx))) * scales[step]
        logits = (score / 0.05).reshape(steps_per_epoch, BATCH)
        weight = np.exp(logits - logits.max(axis=1, keepdims=True))
        weight = (weight / weight.sum(axis=1, keepdims=True)).ravel()
        del logits
        for start in range(0, len(idx), rows_per_file):
            end = start + rows_per_file
            n = len(idx[start:end])
            table = pa.table({"uid": pa.array(uids[idx[start:end]], pa.binary()).cast(pa.string()), "step": step[start:end],
                              "epoch": np.full(n, epoch, np.int32), "rank": np.zeros(n, np.int32),
                              "score": score[start:end].astype(np.float32), "weight": weight[start:end].astype(np.float32),
                              "batch_size": np.full(n, BATCH, np.int32)})
            pq.write_table(table, f"{directory}/{part:05d}.parquet")
            part += 1
    np.save(f"{directory}/../noisy.npy", noisy)


def run_ray(scores: str, output: str) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from raymimic.select.pipeline import FilterConfig, run_filter

    started = time.time()
    summary = run_filter(FilterConfig(scores, output, method="gmm"))
    return {"seconds": time.time() - started, "n_kept": summary["n_kept"]}


def run_baseline(scores: str, output: str, fit_sample: int = 100_000) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq
    from sklearn.mixture import GaussianMixture

    from raymimic.data.uids import write_subset

    started = time.time()
    table = pq.read_table(scores, columns=["uid", "step", "score"])
    step = table["step"].to_numpy()
    score = table["score"].to_numpy().astype(np.float64)
    step_index, inverse = np.unique(step, return_inverse=True)
    count = np.bincount(inverse)
    mean = np.bincount(inverse, score) / count
    std = np.sqrt(np.bincount(inverse, (score - mean[inverse]) ** 2) / count)
    z = (score - mean[inverse]) / std[inverse]
    sample = np.random.default_rng(0).choice(z, size=min(fit_sample, len(z)), replace=False)
    gmm = GaussianMixture(2, n_init=2, random_state=0).fit(sample.reshape(-1, 1))
    high = int(np.argmax(gmm.means_.ravel()))
    vote = gmm.predict_proba(z.reshape(-1, 1))[:, high] > 0.5
    frame = pd.DataFrame({"uid": table["uid"].to_numpy(zero_copy_only=False), "vote": vote, "z": z})
    per_uid = frame.groupby("uid").agg(votes=("vote", "sum"), n=("vote", "size"), score=("z", "mean"))
    keep = 2 * per_uid["votes"] > per_uid["n"]
    os.makedirs(output, exist_ok=True)
    per_uid.assign(keep=keep).reset_index().to_parquet(f"{output}/decisions.parquet")
    write_subset(f"{output}/keep.npy", per_uid.index[keep])
    return {"seconds": time.time() - started, "n_kept": int(keep.sum())}


def _tree_rss_bytes(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants, read from /proc (Linux)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def measure(mode: str, scores: str, output: str) -> dict:
    """Run one mode in a child process; sample the RSS of its whole process tree."""
    child = subprocess.Popen([sys.executable, __file__, "--_child", mode, scores, output], stdout=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss_bytes(child.pid))
        time.sleep(0.1)
    out, _ = child.communicate()
    if child.returncode:
        raise RuntimeError(f"{mode} run failed with exit code {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak / 2**20
    return result


def f1_dropped(output: str, noisy_path: str) -> float:
    """F1 of the dropped set against the generated truth, matched on the uid's low word (its index)."""
    import pyarrow.parquet as pq

    from raymimic.data.uids import arrow_uid_pairs
    from raymimic.select.quality import detection_metrics

    decisions = pq.read_table(f"{output}/decisions.parquet", columns=["uid", "keep"])
    _, index = arrow_uid_pairs(decisions["uid"])
    truth = np.load(noisy_path)[index.astype(np.int64)]
    return float(detection_metrics(decisions["keep"].to_numpy().astype(bool), truth)["f1"])


def bench_rows(rows: int, workdir: str, epochs: int, baseline_max_rows: int) -> dict:
    base = f"{workdir}/rows_{rows}_e{epochs}"
    scores = f"{base}/scores"
    if not os.path.isdir(scores):
        started = time.time()
        generate(rows, scores, epochs)
        print(f"generated {rows:,d} rows in {time.time() - started:.0f}s", flush=True)
    entry = {"rows": rows, "epochs": epochs}
    for mode in ("baseline", "ray"):
        if mode == "baseline" and rows > baseline_max_rows:
            entry[mode] = {"skipped": f"the single-process pass holds the whole table in memory; not run above {baseline_max_rows:,d} rows "
                                      "(see its peak memory per row at the sizes it ran)"}
            continue
        r = measure(mode, scores, f"{base}/out_{mode}")
        r["rows_per_s"] = rows / r["seconds"]
        r["f1_dropped"] = f1_dropped(f"{base}/out_{mode}", f"{base}/noisy.npy")
        entry[mode] = r
    if "seconds" in entry["baseline"]:
        entry["time_ratio_ray_over_baseline"] = entry["ray"]["seconds"] / entry["baseline"]["seconds"]
        entry["memory_ratio_ray_over_baseline"] = entry["ray"]["peak_rss_mb"] / entry["baseline"]["peak_rss_mb"]
    return entry


def line(entry: dict) -> str:
    def mode(name: str) -> str:
        r = entry[name]
        if "seconds" not in r:
            return f"{name} skipped"
        return f"{name} {r['seconds']:7.1f}s {r['rows_per_s']:>10,.0f} rows/s {r['peak_rss_mb']:7.0f} MB F1 {r['f1_dropped']:.3f}"

    ratios = (f" | time x{entry['time_ratio_ray_over_baseline']:.2f} mem x{entry['memory_ratio_ray_over_baseline']:.2f}"
              if "time_ratio_ray_over_baseline" in entry else "")
    return f"{entry['rows']:>11,d} rows | {mode('baseline')} | {mode('ray')}{ratios}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        mode, scores, output = sys.argv[2:5]
        result = (run_ray if mode == "ray" else run_baseline)(scores, output)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="score-table rows to benchmark (e.g. 1000000 10000000)")
    parser.add_argument("--workdir", help="where to write tables and outputs (default: a temporary directory)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the uids (uids = rows / epochs)")
    parser.add_argument("--baseline-max-rows", type=int, default=10_000_000,
                        help="skip the single-process baseline above this many rows (it holds the whole table in memory)")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="stage2_bench_")
    results = []
    for rows in args.rows:
        entry = bench_rows(rows, workdir, args.epochs, args.baseline_max_rows)
        results.append(entry)
        print(line(entry), flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = {mode: {"time": last[mode]["seconds"] / first[mode]["seconds"],
                         "memory": last[mode]["peak_rss_mb"] / first[mode]["peak_rss_mb"]}
                  for mode in ("baseline", "ray") if "seconds" in first[mode] and "seconds" in last[mode]}
        print(f"rows x{last['rows'] / first['rows']:.0f}: time growth {json.dumps(growth)}")
        results.append({"growth_first_to_last": growth})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
