"""negCLIPLoss and NormSim at the paper's scale (arXiv 2405.19547): memory per task, agreement, time.

    python benchmarks/filters_scale.py [--json out.json] [--device cuda]

Every measurement runs in its own fresh Python process (one torch thread by default, as a 1-CPU
Ray task), which reports its peak resident memory (``ru_maxrss``) and the resident memory right
after its imports; synthetic, normalised embeddings are generated in chunks.

- ``negclip bank``: the driver's first pass: :func:`bank_candidates` over a synthetic pool of
  ``--pool-rows`` rows (10,000-row batches, as Ray Data would hand them), merged into K banks
  of B rows (``--batch-size`` 32,768, ``--k`` 10, float16, ``--dim`` 768); the bank is saved.
- ``negclip task``: one task: the saved bank (loaded whole, as a task holds it mapped from the
  object store), a block of ``--block-rows`` rows held as a pandas frame, and the stage's own scoring
  function on its first ``--score-rows`` rows (the rest would be the same per-call work;
  time for the block is extrapolated).
- ``negclip agreement``: a pool of ``--agree-rows`` rows (``--agree-dim``, B = ``--agree-batch``,
  K = 10, tau = 0.01): top-30% overlap of the stage's scores with the paper's procedure (K random
  permutations of the pool cut into batches of B, computed here independently in torch), of two
  reference runs with different seeds (the ceiling set by batch randomness), of two bank seeds, and
  with ``--old`` of the previous design (batches drawn inside each block, blocks sorted by topic as
  metadata files are); and the largest score change between a float16 and a float32 bank.
- ``normsim p=2`` / ``normsim p=inf``: ``--targets`` (1.28M) targets of ``--target-dim`` (512) written
  to a .npy, then one process builds the :class:`NormSimFilter` from the file (driver role: read in
  chunks, normalised once) and scores a block (task role): an upper bound for either role. p = 2
  scores ``--normsim-rows`` (50,000) rows, p = inf ``--normsim-inf-rows``; both are compared with the
  direct formula (the full rows x targets similarity matrix) on ``--exact-rows`` rows.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GENERATE_CHUNK = 10_000
TOP = 0.3


# ------------------------------------------------------------------------- synthetic data
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def synthetic_chunk(start: int, stop: int, dim: int, seed: int = 0, n_topics: int = 200):
    """Rows start..stop of a CLIP-like pool: Zipf-sized topics, per-row caption quality, 15% mismatched captions.
    Cosines: matched pairs up to ~0.36, same-topic ~0.16, unrelated ~0. Deterministic per 10,000-row chunk."""
    centres = _unit(np.random.default_rng([seed, 1]).standard_normal((n_topics, dim)))
    weights = 1 / np.arange(1, n_topics + 1) ** 0.8
    rng = np.random.default_rng([seed, 2, start])
    n = stop - start
    topic = rng.choice(n_topics, n, p=weights / weights.sum())
    own = _unit(rng.standard_normal((n, dim)))
    quality = rng.random(n)
    img = _unit(0.4 * centres[topic] + 0.45 * own + 0.8 * rng.standard_normal((n, dim)) / np.sqrt(dim))
    txt = 0.4 * centres[topic] + 0.45 * quality[:, None] * own + 0.8 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    wrong = rng.random(n) < 0.15
    other = rng.choice(n_topics, int(wrong.sum()), p=weights / weights.sum())
    noise = 0.8 * rng.standard_normal((len(other), dim)) / np.sqrt(dim)
    txt[wrong] = 0.4 * centres[other] + 0.45 * _unit(rng.standard_normal((len(other), dim))) + noise
    uids = [f"{i:032x}" for i in range(start, stop)]
    return uids, topic, img.astype(np.float32), _unit(txt).astype(np.float32)


def synthetic_frame(start: int, stop: int, dim: int, seed: int = 0):
    import pandas as pd

    uids, topic, img, txt = synthetic_chunk(start, stop, dim, seed)
    return pd.DataFrame({"uid": uids, "topic": topic, "l14_img": list(img), "l14_txt": list(txt)})


def synthetic_pool(rows: int, dim: int, seed: int = 0):
    parts = [synthetic_chunk(s, min(rows, s + GENERATE_CHUNK), dim, seed) for s in range(0, rows, GENERATE_CHUNK)]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
            np.concatenate([p[3] for p in parts]))


# ------------------------------------------------------------------------------ helpers
def _rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = TOP) -> float:
    """|top(a) & top(b)| / |top(a)|, top = the ``fraction`` of rows with the highest score."""
    k = int(round(fraction * len(a)))
    return len(np.intersect1d(np.argsort(-a)[:k], np.argsort(-b)[:k])) / k


def reference_negclip(img: np.ndarray, txt: np.ndarray, batch_size: int, k: int, tau: float, seed: int, device: str = "cpu",
                      chunk: int = 1024) -> np.ndarray:
    """The paper's procedure, independently of raymimic: K random permutations of the whole pool cut into
    batches of B; R(i) sums, over its K batches, the log-sum-exp of its row and of its column (float32
    similarities, float64 sums). The pool size should be a multiple of B (no short batch)."""
    import torch

    rng = np.random.default_rng(seed)
    n = len(img)
    x = torch.from_numpy(_unit(img).astype(np.float32)).to(device)
    y = torch.from_numpy(_unit(txt).astype(np.float32)).to(device)
    r = torch.zeros(n, dtype=torch.float64, device=device)
    for _ in range(k):
        order = torch.from_numpy(rng.permutation(n)).to(device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
            for c0 in range(0, len(idx), chunk):
                rows = idx[c0:c0 + chunk]
                r[rows] += torch.logsumexp(xb[c0:c0 + chunk] @ yb.T / tau, dim=1).double()  # image i vs the batch's texts
                r[rows] += torch.logsumexp(yb[c0:c0 + chunk] @ xb.T / tau, dim=1).double()  # text i vs the batch's images
    clip = (x * y).sum(dim=1).double()
    return (clip - tau * r / (2 * k)).cpu().numpy()


# -------------------------------------------------------------------------------- parts
def part_negclip_bank(a) -> dict:
    from raymimic.select.filters import bank_candidates, draw_negative_bank

    base = _rss_now_mb()
    start = time.time()

    def candidates(n_banks, threshold):
        for s in range(0, a.pool_rows, GENERATE_CHUNK):
            frame = synthetic_frame(s, min(a.pool_rows, s + GENERATE_CHUNK), a.dim)
            yield bank_candidates(frame, n_banks=n_banks, batch_size=a.batch_size, threshold=threshold, dtype="float16")

    bank = draw_negative_bank(candidates, a.pool_rows, a.batch_size, a.k)
    seconds = time.time() - start
    peak = _peak_mb()
    np.savez(os.path.join(a.workdir, "bank.npz"), **{k: v for k, v in bank.items() if isinstance(v, np.ndarray)})
    with open(os.path.join(a.workdir, "bank.json"), "w") as f:
        json.dump({k: v for k, v in bank.items() if not isinstance(v, np.ndarray)}, f)
    bank_mb = (bank["img"].nbytes + bank["txt"].nbytes) / 2**20
    return {"part": "negclip bank (driver)", "rows": a.pool_rows, "seconds": seconds, "peak_mb": peak, "imports_mb": base,
            "bank_mb": bank_mb, "banks": list(bank["hash"].shape), "note": f"K x B = {bank['hash'].shape[0]} x {bank['hash'].shape[1]}, "
            f"dim {a.dim}, float16: {bank_mb:.0f} MiB"}


def part_negclip_task(a) -> dict:
    import torch

    from raymimic.select.filters import negclip_score_frame

    torch.set_num_threads(a.threads)
    base = _rss_now_mb()
    arrays = np.load(os.path.join(a.workdir, "bank.npz"), mmap_mode="r")  # npz members load into memory: like the task's copy
    bank = {name: arrays[name] for name in arrays.files}
    with open(os.path.join(a.workdir, "bank.json")) as f:
        bank.update(json.load(f))
    import pandas as pd

    block = pd.concat([synthetic_frame(s, min(a.block_rows, s + GENERATE_CHUNK), a.dim, seed=9)
                       for s in range(0, a.block_rows, GENERATE_CHUNK)], ignore_index=True)
    start = time.time()
    for r0 in range(0, a.score_rows, 4096):  # the stage's calls: 4,096 rows each (rows_per_call)
        part = block.iloc[r0:min(a.score_rows, r0 + 4096)].copy()
        negclip_score_frame(part, bank, "negclip_score", "l14_img", "l14_txt", "uid", 0.01, 512, 8192, 1 if a.device == "cuda" else 0)
    seconds = time.time() - start
    return {"part": "negclip task", "rows": a.score_rows, "seconds": seconds, "peak_mb": _peak_mb(), "imports_mb": base,
            "ms_per_row": 1000 * seconds / a.score_rows, "block_rows": a.block_rows,
            "note": f"block of {a.block_rows:,} rows held; {a.score_rows:,} scored; "
            f"whole block ~{seconds / a.score_rows * a.block_rows:.0f} s "
            f"({a.threads} thread(s), {a.device})"}


def part_negclip_agreement(a) -> dict:
    import pandas as pd
    import torch

    from raymimic.select.filters import NegCLIPLossFilter, neg_clip_loss

    torch.set_num_threads(a.threads)
    base = _rss_now_mb()
    uids, topic, img, txt = synthetic_pool(a.agree_rows, a.agree_dim)
    frame = pd.DataFrame({"uid": uids, "l14_img": list(img), "l14_txt": list(txt)})
    out, times = {}, {}
    for name, seed, dtype in (("bank seed 0", 0, "float16"), ("bank seed 1", 1, "float16")):
        start = time.time()
        stage = NegCLIPLossFilter(batch_size=a.agree_batch, k=10, tau=0.01, seed=seed, bank_dtype=dtype,
                                  num_gpus=1 if a.device == "cuda" else 0)
        stage.draw_bank(frame)
        out[name] = np.concatenate([stage.score_batch(frame.iloc[s:s + 4096]) for s in range(0, len(frame), 4096)])
        times[name] = time.time() - start
    exact = NegCLIPLossFilter(batch_size=a.agree_batch, k=10, tau=0.01, seed=0, bank_dtype="float32")
    exact.draw_bank(frame)
    sub = frame.iloc[:2048]
    fp16_gap = float(np.abs(exact.score_batch(sub) - out["bank seed 0"][:2048]).max())
    for name, seed in (("reference seed 0", 0), ("reference seed 1", 1)):
        start = time.time()
        out[name] = reference_negclip(img, txt, a.agree_batch, 10, 0.01, seed, a.device)
        times[name] = time.time() - start
    rows = [("bank seed 0 vs reference seed 0", top_overlap(out["bank seed 0"], out["reference seed 0"])),
            ("bank seed 1 vs reference seed 1", top_overlap(out["bank seed 1"], out["reference seed 1"])),
            ("reference seed 0 vs reference seed 1", top_overlap(out["reference seed 0"], out["reference seed 1"])),
            ("bank seed 0 vs bank seed 1", top_overlap(out["bank seed 0"], out["bank seed 1"]))]
    if a.old:
        # previous design: batches inside each block; blocks sorted by topic, sized like a 110k-row file's 42,909 / 42,909 / 24,182
        order = np.argsort(topic, kind="stable")
        cuts = (np.cumsum([0, 42909, 42909, 24182]) / 110000 * len(order)).astype(int)
        start = time.time()
        old = np.zeros(len(order))
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            idx = order[c0:c1]
            old[idx] = neg_clip_loss(img[idx], txt[idx], a.agree_batch, 10, 0.01, np.random.default_rng(c0))
        times["previous design"] = time.time() - start
        rows.append(("previous design (per-block batches) vs reference seed 0", top_overlap(old, out["reference seed 0"])))
    return {"part": "negclip agreement", "rows": a.agree_rows, "batch_size": a.agree_batch, "dim": a.agree_dim, "k": 10, "tau": 0.01,
            "agreement_top30": dict(rows), "float16_vs_float32_bank_max_abs": fp16_gap, "score_std": float(out["bank seed 0"].std()),
            "seconds": times, "peak_mb": _peak_mb(), "imports_mb": base}


def part_write_targets(a) -> dict:
    path = os.path.join(a.workdir, "targets.npy")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(a.targets, a.target_dim))
    for s in range(0, a.targets, 65536):
        rng = np.random.default_rng([7, s])
        stop = min(a.targets, s + 65536)
        scale = rng.uniform(0.5, 2, (stop - s, 1)).astype(np.float32)  # unnormalised, as stored embeddings may be
        out[s:stop] = rng.standard_normal((stop - s, a.target_dim), dtype=np.float32) * scale
    out.flush()
    return {"part": "write targets", "path": path, "gb": os.path.getsize(path) / 1e9}


def _direct_norm_sim(rows: np.ndarray, path: str, p: float) -> np.ndarray:
    """The formula as written: the full [rows, targets] similarity matrix (float64), then its p-norm per row."""
    targets = np.load(path, mmap_mode="r")
    sims = np.concatenate([_unit(rows.astype(np.float64)) @ _unit(np.asarray(targets[s:s + 65536], dtype=np.float64)).T
                           for s in range(0, len(targets), 65536)], axis=1)
    return np.abs(sims).max(axis=1) if np.isinf(p) else np.linalg.norm(sims, axis=1)


def part_normsim(a) -> dict:
    import pandas as pd
    import torch

    from raymimic.select.filters import NormSimFilter, normsim_score_frame

    torch.set_num_threads(a.threads)
    p = np.inf if a.p == "inf" else 2
    base = _rss_now_mb()
    path = os.path.join(a.workdir, "targets.npy")
    start = time.time()
    stage = NormSimFilter(path, p=p, min_score=0.0, target_dtype=a.target_dtype)
    prepare_seconds = time.time() - start
    prepare_peak = _peak_mb()
    n_rows = a.normsim_rows if p == 2 else a.normsim_inf_rows
    _, _, img, _ = synthetic_pool(max(n_rows, a.exact_rows), a.target_dim, seed=3)
    block = pd.DataFrame({"l14_img": list(img[:n_rows])})
    start = time.time()
    gpus = 1 if a.device == "cuda" else 0
    scores = np.concatenate([normsim_score_frame(block.iloc[s:s + 4096].copy(), stage.state, "s", "l14_img", stage.chunk_rows,
                                                  stage.chunk_targets, gpus)["s"].to_numpy() for s in range(0, n_rows, 4096)])
    seconds = time.time() - start
    peak = _peak_mb()
    direct = _direct_norm_sim(img[:a.exact_rows], path, p)
    held = stage.state["targets"].nbytes if "targets" in stage.state else stage.state["gram"].nbytes
    return {"part": f"normsim p={a.p}", "rows": n_rows, "targets": stage.n_targets, "dim": a.target_dim, "prepare_seconds": prepare_seconds,
            "prepare_peak_mb": prepare_peak, "seconds": seconds, "ms_per_row": 1000 * seconds / n_rows, "peak_mb": peak, "imports_mb": base,
            "state_mb": held / 2**20, "exact_rows": a.exact_rows, "max_abs_vs_direct": float(np.abs(scores[:a.exact_rows] - direct).max()),
            "agreement_top30_vs_direct": top_overlap(scores[:a.exact_rows], direct),
            "target_dtype": a.target_dtype if p != 2 else None}


PARTS = {"negclip_bank": part_negclip_bank, "negclip_task": part_negclip_task, "negclip_agreement": part_negclip_agreement,
         "write_targets": part_write_targets, "normsim": part_normsim}


def _run_part(name: str, argv: list[str], extra: list[str] = ()) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--part", name, *argv, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"part {name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (a 1-CPU Ray task: 1)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=32768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--pool-rows", type=int, default=100_000)
    parser.add_argument("--block-rows", type=int, default=50_000)
    parser.add_argument("--score-rows", type=int, default=1024)
    parser.add_argument("--agree-rows", type=int, default=20480)
    parser.add_argument("--agree-batch", type=int, default=4096)
    parser.add_argument("--agree-dim", type=int, default=256)
    parser.add_argument("--old", action="store_true", help="add the previous (per-block) design to the agreement table (about 2 min)")
    parser.add_argument("--targets", type=int, default=1_280_000)
    parser.add_argument("--target-dim", type=int, default=512)
    parser.add_argument("--target-dtype", default="float32", choices=["float32", "float16"], help="NormSim p=inf target storage")
    parser.add_argument("--normsim-rows", type=int, default=50_000)
    parser.add_argument("--normsim-inf-rows", type=int, default=1024)
    parser.add_argument("--exact-rows", type=int, default=256)
    parser.add_argument("--skip", nargs="*", default=[], choices=["negclip", "agreement", "normsim"])
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--p", default="2", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.part:
        print(json.dumps(PARTS[args.part](args)))
        return
    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if args.json:
        argv = [a for a in argv if a != args.json]
    results = []
    with tempfile.TemporaryDirectory(prefix="filters_scale_") as workdir:
        argv += ["--workdir", workdir]
        if "negclip" not in args.skip:
            results.append(_run_part("negclip_bank", argv))
            results.append(_run_part("negclip_task", argv))
        if "agreement" not in args.skip:
            results.append(_run_part("negclip_agreement", argv))
        if "normsim" not in args.skip:
            _run_part("write_targets", argv)
            results.append(_run_part("normsim", argv, ["--p", "2"]))
            results.append(_run_part("normsim", argv, ["--p", "inf"]))
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("part", "p", "workdir")}, "results": results}, f, indent=2)


def report(results: list[dict], args) -> None:
    print(f"\nmemory and time per process ({args.threads} torch thread(s), {args.device}); peak = ru_maxrss, imports = RSS after imports")
    print(f"| {'measurement':<34} | {'rows':>9} | {'peak MiB':>8} | {'imports MiB':>11} | {'seconds':>8} | note")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 10}|{'-' * 13}|{'-' * 10}|------")
    for r in results:
        if r["part"] == "negclip agreement":
            continue
        seconds = r["seconds"]
        note = r.get("note", "")
        if r["part"].startswith("normsim"):
            note = (f"{r['targets']:,} targets x {r['dim']}; state {r['state_mb']:.1f} MiB; prepare {r['prepare_seconds']:.0f} s "
                    f"(peak {r['prepare_peak_mb']:.0f} MiB); max |diff| vs direct {r['max_abs_vs_direct']:.1e} on {r['exact_rows']} rows")
        print(f"| {r['part']:<34} | {r['rows']:>9,} | {r['peak_mb']:>8.0f} | {r['imports_mb']:>11.0f} | {seconds:>8.1f} | {note}")
    for r in results:
        if r["part"] != "negclip agreement":
            continue
        print(f"\nnegCLIPLoss top-30% agreement: pool {r['rows']:,} x {r['dim']}, B = {r['batch_size']:,}, K = 10, tau = 0.01")
        print(f"| {'pair':<58} | agreement |")
        print(f"|{'-' * 60}|-----------|")
        for name, value in r["agreement_top30"].items():
            print(f"| {name:<58} | {100 * value:>8.1f}% |")
        print(f"float16 vs float32 bank: max |score diff| {r['float16_vs_float32_bank_max_abs']:.1e} (score std {r['score_std']:.3f})")
        print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()))


if __name__ == "__main__":
    main()
