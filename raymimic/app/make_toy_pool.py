"""``raymimic make-toy-pool``: write a small DataComp-layout pool with known noisy captions."""
from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a toy pool in the real DataComp layout, so every reader and filter can be tried
without downloading anything:

  OUTPUT/shards/{:08d}.tar (+ .parquet, _stats.json)   webdataset samples .jpg .txt .json(uid)
  OUTPUT/metadata/{:08d}.parquet + .npz                 DataComp metadata columns and
                                                        b32/l14 image/text embeddings
  OUTPUT/ground_truth.parquet                           uid, is_noisy, kind, label, class_name
  OUTPUT/eval/                                          clean held-out split, classnames.json,
                                                        templates.json (zero-shot evaluation)

Images are coloured shapes (16 classes such as "red circle", "blue cross") or, with
--images digits|mixed, scikit-learn's handwritten digits inked in colour; captions describe
them ("a small red circle on the left", "a handwritten seven in blue ink"). A fraction --noise of the samples gets a
corrupted caption, split evenly between three kinds: another image's caption, a too-short
caption, unrelated boilerplate. ground_truth.parquet says which; it is for evaluation only.
The same --seed always writes the same pool."""

EPILOG = """\
examples:
  raymimic make-toy-pool --output /tmp/toy --samples 20000 --noise 0.3 --seed 0
  raymimic make-toy-pool --output /data/toy1m --samples 1000000 --noise 0.5 --shard-size 10000
then read it with:  python -c "import ray, raymimic; print(raymimic.read_pool('/tmp/toy').count())"
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-toy-pool",
        help="write a small DataComp-layout pool of shape images with a known fraction of noisy captions",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="directory to write the pool into (local path)")
    parser.add_argument("--samples", type=int, required=True, help="number of training samples in the pool")
    parser.add_argument("--noise", type=float, default=0.3, help="fraction of samples with a corrupted caption, 0..1 (default 0.3)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same pool (default 0)")
    parser.add_argument("--shard-size", type=int, default=10000, help="samples per tar shard (default 10000, as DataComp)")
    parser.add_argument("--eval-samples", type=int, default=1600, help="samples in the clean held-out eval split (default 1600)")
    parser.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32: a tiny CLIP learns it on a CPU)")
    parser.add_argument("--images", choices=["shapes", "digits", "mixed"], default="shapes",
                        help="shapes: drawn coloured shapes, 16 classes (default); digits: scikit-learn's "
                        "handwritten digits, coloured, 10 classes; mixed: both, 26 classes")
    parser.add_argument("--workers", type=int, default=None, help="processes writing shards in parallel (default: CPU count)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import json

    from raymimic.data.toy_pool import make_toy_pool

    summary = make_toy_pool(
        args.output,
        samples=args.samples,
        noise=args.noise,
        seed=args.seed,
        shard_size=args.shard_size,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        workers=args.workers,
        images=args.images,
    )
    print(json.dumps(summary, indent=2))
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['output']} in {summary['seconds']} s")
    return 0
