"""Stage 2 benchmark: the Ray Data mimic filter vs a hand-written single-process pass.

    python benchmarks/stage2_filter.py --rows 1000000 2000000 --json out.json

For each row count it generates a bimodal score table (parquet files, 2 epochs, global batch
1024, 30% low-value samples, drifting scale, heavy-tailed weights), then times in separate
processes (so that peak memory is clean):

- ``ray``: ``raymimic.select.pipeline.run_filter`` (GMM, default parameters) on a local Ray
  instance, writing keep.npy / decisions.parquet / summary.json;
- ``baseline``: pyarrow reads every file into memory, numpy computes per-step z-scores,
  scikit-learn fits the same GMM on the same sample size, pandas groups per uid, and
  ``raymimic.data.uids.write_subset`` writes keep.npy.

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


def generate(rows: int, directory: str, rows_per_file: int = 250_000, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    n_uids = rows // 2
    noisy = rng.random(n_uids) < NOISE
    uid_hi = rng.integers(0, 2**63, n_uids, dtype=np.int64)
    uids = np.array([f"{h:016x}{i:016x}" for i, h in enumerate(uid_hi)])
    steps_per_epoch = n_uids // BATCH
    total_steps = 2 * steps_per_epoch
    scales = np.geomspace(5.0, 0.05, total_steps)
    os.makedirs(directory, exist_ok=True)
    part = 0
    for epoch in range(2):
        order = rng.permutation(n_uids)[: steps_per_epoch * BATCH].reshape(steps_per_epoch, BATCH)
        step = epoch * steps_per_epoch + np.repeat(np.arange(steps_per_epoch), BATCH)
        idx = order.ravel()
        score = (np.where(noisy[idx], -1.0, 1.0) + 0.45 * rng.standard_normal(len(idx))) * scales[step]
        logits = (score / 0.05).reshape(steps_per_epoch, BATCH)
        weight = np.exp(logits - logits.max(axis=1, keepdims=True))
        weight = (weight / weight.sum(axis=1, keepdims=True)).ravel()
        table = pa.table({"uid": uids[idx], "step": step.astype(np.int64), "epoch": np.full(len(idx), epoch, np.int32),
                          "rank": np.zeros(len(idx), np.int32), "score": score.astype(np.float32), "weight": weight.astype(np.float32),
                          "batch_size": np.full(len(idx), BATCH, np.int32)})
        for start in range(0, table.num_rows, rows_per_file):
            pq.write_table(table.slice(start, rows_per_file), f"{directory}/{part:05d}.parquet")
            part += 1
    np.save(f"{directory}/../noisy_uids.npy", uids[noisy])


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
    import pandas as pd

    from raymimic.select.quality import detection_metrics

    decisions = pd.read_parquet(f"{output}/decisions.parquet", columns=["uid", "keep"])
    truth = decisions["uid"].isin(set(np.load(noisy_path).tolist())).to_numpy()
    return float(detection_metrics(decisions["keep"].to_numpy(bool), truth)["f1"])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        mode, scores, output = sys.argv[2:5]
        result = (run_ray if mode == "ray" else run_baseline)(scores, output)
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="score-table rows to benchmark (e.g. 1000000 10000000)")
    parser.add_argument("--workdir", help="where to write tables and outputs (default: a temporary directory)")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="stage2_bench_")
    results = []
    for rows in args.rows:
        base = f"{workdir}/rows_{rows}"
        scores = f"{base}/scores"
        if not os.path.isdir(scores):
            generate(rows, scores)
        entry = {"rows": rows}
        for mode in ("baseline", "ray"):
            r = measure(mode, scores, f"{base}/out_{mode}")
            r["rows_per_s"] = rows / r["seconds"]
            r["f1_dropped"] = f1_dropped(f"{base}/out_{mode}", f"{base}/noisy_uids.npy")
            entry[mode] = r
        entry["time_ratio_ray_over_baseline"] = entry["ray"]["seconds"] / entry["baseline"]["seconds"]
        entry["memory_ratio_ray_over_baseline"] = entry["ray"]["peak_rss_mb"] / entry["baseline"]["peak_rss_mb"]
        results.append(entry)
        print(f"{rows:>11,d} rows | baseline {entry['baseline']['seconds']:7.1f}s {entry['baseline']['rows_per_s']:>10,.0f} rows/s "
              f"{entry['baseline']['peak_rss_mb']:7.0f} MB "
              f"F1 {entry['baseline']['f1_dropped']:.3f} | ray {entry['ray']['seconds']:7.1f}s {entry['ray']['rows_per_s']:>10,.0f} rows/s "
              f"{entry['ray']['peak_rss_mb']:7.0f} MB "
              f"F1 {entry['ray']['f1_dropped']:.3f} | time x{entry['time_ratio_ray_over_baseline']:.2f} "
              f"mem x{entry['memory_ratio_ray_over_baseline']:.2f}", flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        growth = {
            mode: {"time": last[mode]["seconds"] / first[mode]["seconds"], "memory": last[mode]["peak_rss_mb"] / first[mode]["peak_rss_mb"]}
            for mode in ("baseline", "ray")
        }
        print(f"rows x{last['rows'] / first['rows']:.0f}: time growth {json.dumps(growth)}")
        results.append({"growth_first_to_last": growth})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
