"""The score-only pass's backward restricted to what the mimic layer needs, against the full backward.

    python benchmarks/score_only_backward.py                              # raymimic-small, batch 64, CPU
    python benchmarks/score_only_backward.py --model ViT-B-32 --batch 16 --json out.json

Two :class:`raymimic.train.score_only.MimicScorer` on the same checkpoint, reference and batch:
one with every parameter but the mimic layer's frozen (the pass as it runs), one with
``full_backward=True`` (a backward through both towers, as before). Calls are interleaved,
``--repeats`` times each after a warm-up call; the ratio is the median of the repeats' ratios,
wall time and process CPU time side by side. The rows of both must be identical (checked).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="raymimic-small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mimic-layer", default="image-mlp")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    from raymimic.clip import create_model, save_checkpoint
    from raymimic.train.score_only import MimicScorer

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)  # open_clip: no pretrained weights loaded (random models on purpose)
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        model = create_model(args.model)[0]
        checkpoint = save_checkpoint(model, f"{folder}/model.pt", args.model)
        torch.manual_seed(1)
        reference = save_checkpoint(create_model(args.model)[0], f"{folder}/reference.pt", args.model)
        scorers = {kind: MimicScorer(args.model, checkpoint, reference, mimic_layer=args.mimic_layer, full_backward=kind == "full")
                   for kind in ("full", "restricted")}
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    rng = np.random.default_rng(0)
    batch = {"uid": [f"{i:032x}" for i in range(args.batch)],
             "image": rng.integers(0, 256, (args.batch, 3, size, size), dtype=np.uint8),
             "text": rng.integers(1, 1000, (args.batch, model.context_length)).astype(np.int64)}
    rows = {kind: scorer(batch) for kind, scorer in scorers.items()}  # warm-up, and the rows to compare
    identical = all(np.array_equal(rows["full"][c], rows["restricted"][c]) for c in rows["full"] if c != "uid")

    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in scorers}
    for _ in range(args.repeats):
        for kind, scorer in scorers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            scorer(batch)
            times[kind].append((time.perf_counter() - wall, time.process_time() - cpu))
    ratios = [f[0] / r[0] for f, r in zip(times["full"], times["restricted"])]
    cpu_ratios = [f[1] / r[1] for f, r in zip(times["full"], times["restricted"])]
    result = {
        "model": args.model, "batch": args.batch, "mimic_layer": args.mimic_layer, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "identical_rows": identical,
        "full_s": statistics.median(t[0] for t in times["full"]),
        "restricted_s": statistics.median(t[0] for t in times["restricted"]),
        "full_cpu_s": statistics.median(t[1] for t in times["full"]),
        "restricted_cpu_s": statistics.median(t[1] for t in times["restricted"]),
        "speedup_wall": statistics.median(ratios), "speedup_cpu": statistics.median(cpu_ratios),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
