"""Stage 2 benchmark: ``raymimic filter`` as a whole process vs single-process passes over the same table.

    python benchmarks/stage2_filter.py --rows 1000000 6000000 --epochs 3 --json out.json

For each row count it generates a bimodal score table (parquet files of 250,000 rows, 2 epochs
or ``--epochs``, global batch 1024, 30% low-value samples, drifting scale, heavy-tailed weights),
then runs each mode as its own process, one after the other (so that time, CPU and memory are
each process tree's own):

- ``ray``: ``python -m raymimic.app.cli filter --method gmm`` (default parameters), Ray's start
  included, writing keep.npy / decisions.parquet / summary.json;
- ``lean``: the baseline. pyarrow reads ``uid, step, score``; per-step z-scores with
  ``np.bincount``; a 2-component scikit-learn GMM fitted on a 100k-row sample; ``pd.factorize``
  on the uids and a ``bincount`` majority vote; a sorted ``u8,u8`` keep.npy;
- ``ray_before`` (with ``--before-code``): the same command on an earlier version of the package;
- ``pandas``: the same pass grouping per uid with a pandas ``groupby`` on the uid strings and
  writing a decisions table too (slower and larger: kept as a second row);
- ``scan``: a bare scan of the same columns (pyarrow reads ``uid, step, score`` one file at a time
  and touches every value), the floor any pass over the table pays: it writes no keep list.

The single-process passes hold the whole table in memory, so they are skipped above
``--baseline-max-rows``. Wall time is the child process's, from its start to its exit; CPU time is
the user + system time of its whole process tree (driver, raylet, workers), read from /proc every
0.1 s (a process's last 0.1 s can be missed); peak memory is the largest summed RSS of the tree
sampled at the same times (shared object-store pages can be counted in several processes, so the
Ray figure is an upper bound). It reports the ratios of ``ray`` over ``lean`` (time, CPU seconds
per row, memory) and F1 of the dropped set (every generated uid not in keep.npy) against the
generated truth.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
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
    uid_hi = rng.integers(0, 2**64, n_uids, dtype=np.uint64)  # uniform over all 64 bits, as DataComp's uids are
    # the low word is the uid's index: the truth of a decision is noisy[lo]
    uids = pairs_to_hex(uid_hi, np.arange(n_uids, dtype=np.uint64))
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


def run_lean(scores: str, output: str, fit_sample: int = 100_000) -> None:
    """The lean single pass: per-step z-scores, a GMM on a sample, factorized uids, a bincount vote, a sorted keep list."""
    import pandas as pd
    import pyarrow.parquet as pq
    from sklearn.mixture import GaussianMixture

    from raymimic.data.uids import write_subset

    table = pq.read_table(scores, columns=["uid", "step", "score"])
    step = table["step"].to_numpy()
    step = step - step.min()
    score = table["score"].to_numpy().astype(np.float64)
    count = np.bincount(step)
    mean = np.bincount(step, score) / np.maximum(count, 1)
    std = np.sqrt(np.bincount(step, (score - mean[step]) ** 2) / np.maximum(count, 1))
    z = (score - mean[step]) / std[step]
    del score
    sample = z[np.random.default_rng(0).choice(len(z), size=min(fit_sample, len(z)), replace=False)]
    gmm = GaussianMixture(2, n_init=2, random_state=0).fit(sample.reshape(-1, 1))
    vote = gmm.predict_proba(z.reshape(-1, 1))[:, int(np.argmax(gmm.means_.ravel()))] > 0.5
    codes, uids = pd.factorize(table["uid"].to_numpy(zero_copy_only=False))
    del table
    keep = 2 * np.bincount(codes, vote) > np.bincount(codes)
    os.makedirs(output, exist_ok=True)
    write_subset(f"{output}/keep.npy", uids[keep])


def run_pandas(scores: str, output: str, fit_sample: int = 100_000) -> None:
    """The pass with a pandas groupby on the uid strings (and a decisions table)."""
    import pandas as pd
    import pyarrow.parquet as pq
    from sklearn.mixture import GaussianMixture

    from raymimic.data.uids import write_subset

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


def run_scan(scores: str, output: str) -> None:
    """The floor: read ``uid, step, score`` of every file and touch every value, nothing else."""
    import glob

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for path in sorted(glob.glob(f"{scores}/*.parquet")):
        table = pq.read_table(path, columns=["uid", "step", "score"])
        total += int(pc.sum(table["step"]).as_py()) + len(table["uid"].chunks) + int(pc.count(table["score"]).as_py())
        total += int(pc.sum(pc.binary_length(table["uid"])).as_py())
    os.makedirs(output, exist_ok=True)
    with open(f"{output}/scanned.txt", "w") as f:
        f.write(str(total))


def command(mode: str, scores: str, output: str) -> list[str]:
    if mode in ("ray", "ray_before"):
        return [sys.executable, "-m", "raymimic.app.cli", "filter", "--scores", scores, "--output", output, "--method", "gmm"]
    return [sys.executable, __file__, "--_child", mode, scores, output]


def _tree(root: int) -> set[int]:
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
    return tree


def _sample_tree(root: int, cpu: dict[int, float]) -> int:
    """Summed RSS of ``root``'s process tree; records each process's user + system seconds in ``cpu``."""
    total, tick, page = 0, os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        cpu[pid] = max(cpu.get(pid, 0.0), (int(fields[11]) + int(fields[12])) / tick)  # utime + stime
    return total


def measure(mode: str, scores: str, output: str, before_code: str | None = None) -> dict:
    """Run one mode as a child process; sample the RSS and CPU time of its whole process tree."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cwd = None
    if mode == "ray_before":  # the same command on an earlier version of the package (python -m imports from the working folder)
        env["PYTHONPATH"] = cwd = before_code
    started = time.time()
    child = subprocess.Popen(command(mode, scores, output), stdout=subprocess.DEVNULL, env=env, cwd=cwd)
    peak, cpu = 0, {}
    while child.poll() is None:
        peak = max(peak, _sample_tree(child.pid, cpu))
        time.sleep(0.1)
    seconds = time.time() - started
    if child.returncode:
        raise RuntimeError(f"{mode} run failed with exit code {child.returncode}")
    return {"seconds": seconds, "cpu_seconds": sum(cpu.values()), "peak_rss_mb": peak / 2**20}


def f1_dropped(output: str, noisy_path: str) -> float:
    """F1 of the dropped set (every generated uid not in keep.npy) against the generated truth; a uid's low word is its index."""
    from raymimic.data.uids import read_subset
    from raymimic.select.quality import detection_metrics

    noisy = np.load(noisy_path)
    kept = np.zeros(len(noisy), bool)
    kept[read_subset(f"{output}/keep.npy")["f1"].astype(np.int64)] = True
    return float(detection_metrics(kept, noisy)["f1"])


MODES = ("lean", "pandas", "ray", "ray_before", "scan")


def bench_rows(rows: int, workdir: str, epochs: int, baseline_max_rows: int, modes=MODES, before_code: str | None = None) -> dict:
    base = f"{workdir}/rows_{rows}_e{epochs}"
    scores = f"{base}/scores"
    if not os.path.isdir(scores):
        started = time.time()
        generate(rows, scores, epochs)
        print(f"generated {rows:,d} rows in {time.time() - started:.0f}s", flush=True)
    entry = {"rows": rows, "epochs": epochs}
    for mode in modes:
        if mode in ("lean", "pandas") and rows > baseline_max_rows:
            entry[mode] = {"skipped": f"the single-process pass holds the whole table in memory; not run above {baseline_max_rows:,d} rows"}
            continue
        out = f"{base}/out_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        r = measure(mode, scores, out, before_code)
        r["rows_per_s"] = rows / r["seconds"]
        r["cpu_us_per_row"] = 1e6 * r["cpu_seconds"] / rows
        r["f1_dropped"] = None if mode == "scan" else f1_dropped(out, f"{base}/noisy.npy")
        entry[mode] = r
    for ray in ("ray", "ray_before"):
        if "seconds" in entry.get("lean", {}) and "seconds" in entry.get(ray, {}):
            r, lean = entry[ray], entry["lean"]
            entry[f"{ray}_over_lean"] = {"time": r["seconds"] / lean["seconds"], "cpu": r["cpu_seconds"] / lean["cpu_seconds"],
                                         "memory": r["peak_rss_mb"] / lean["peak_rss_mb"]}
        if "seconds" in entry.get("scan", {}) and "seconds" in entry.get(ray, {}):
            entry[f"{ray}_over_scan"] = {"time": entry[ray]["seconds"] / entry["scan"]["seconds"],
                                         "cpu": entry[ray]["cpu_seconds"] / entry["scan"]["cpu_seconds"]}
    return entry


def line(entry: dict) -> str:
    def mode(name: str) -> str:
        r = entry.get(name)
        if r is None or "seconds" not in r:
            return f"{name} skipped"
        f1 = "" if r["f1_dropped"] is None else f" F1 {r['f1_dropped']:.3f}"
        return f"{name} {r['seconds']:6.1f}s {r['cpu_us_per_row']:5.2f} cpu-us/row {r['peak_rss_mb']:6.0f} MB{f1}"

    ratios = "".join(f" | {ray}/lean time x{r['time']:.2f} cpu x{r['cpu']:.2f} mem x{r['memory']:.2f}"
                     for ray in ("ray", "ray_before") if (r := entry.get(f"{ray}_over_lean")))
    ratios += "".join(f" | {ray}/scan time x{r['time']:.2f} cpu x{r['cpu']:.2f}"
                      for ray in ("ray", "ray_before") if (r := entry.get(f"{ray}_over_scan")))
    return f"{entry['rows']:>11,d} rows | " + " | ".join(mode(m) for m in MODES if m in entry) + ratios


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        mode, scores, output = sys.argv[2:5]
        {"lean": run_lean, "pandas": run_pandas, "scan": run_scan}[mode](scores, output)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="score-table rows to benchmark (e.g. 1000000 10000000)")
    parser.add_argument("--workdir", help="where to write tables and outputs (default: a temporary directory)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the uids (uids = rows / epochs)")
    parser.add_argument("--baseline-max-rows", type=int, default=10_000_000,
                        help="skip the single-process baseline above this many rows (it holds the whole table in memory)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["lean", "pandas", "ray"],
                        help="which passes to run (default: lean pandas ray; ray_before needs --before-code)")
    parser.add_argument("--before-code", help="ray_before: a folder holding an earlier raymimic package (e.g. from git archive), run by "
                                              "the same command for a before/after comparison in one invocation")
    parser.add_argument("--json", help="write the results as JSON here")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="stage2_bench_")
    results = []
    for rows in args.rows:
        entry = bench_rows(rows, workdir, args.epochs, args.baseline_max_rows, args.modes, args.before_code)
        results.append(entry)
        print(line(entry), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
