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
caption, unrelated boilerplate. --relabel adds systematic noise: that fraction of the pool
is consistently mislabelled, one way, over --relabel-pairs class pairs ("red circle" images
captioned as "blue square" with otherwise natural captions), the noise a model learns as if it
were signal and only a reference trained on clean data can flag. ground_truth.parquet says
which sample is which (kind, caption_class); it is for evaluation only.
The same --seed always writes the same pool."""

EPILOG = """\
examples:
  raymimic make-toy-pool --output /tmp/toy --samples 20000 --noise 0.3 --seed 0
  raymimic make-toy-pool --output /tmp/sys --samples 20000 --noise 0.2 --relabel 0.1 --relabel-pairs 4
  raymimic make-toy-pool --output /data/toy1m --samples 1000000 --noise 0.5 --shard-size 10000
then read it with:  python -c "import ray, raymimic; print(raymimic.read_pool('/tmp/toy').count())"
"""


OPTIONS = ("output", "samples", "noise", "seed", "shard_size", "eval_samples", "image_size", "images", "workers", "relabel",
           "relabel_pairs")


def register(subparsers) -> None:
    from raymimic.app.options import add_print_config, default
    from raymimic_experiments.toy_pool import IMAGE_SOURCES, ToyPoolConfig

    def dflt(name: str):
        return default(ToyPoolConfig, name)

    classes = {source: len(names) for source, (names, _) in IMAGE_SOURCES.items()}
    parser = subparsers.add_parser(
        "make-toy-pool",
        help="write a small DataComp-layout pool of shape images with a known fraction of noisy captions",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", required=True, help="directory to write the pool into (local path)")
    parser.add_argument("--samples", type=int, required=True, help="number of training samples in the pool")
    parser.add_argument("--noise", type=float, help=f"fraction of samples with a corrupted caption, 0..1 (default: {dflt('noise')})")
    parser.add_argument("--seed", type=int, help=f"random seed; the same seed writes the same pool (default: {dflt('seed')})")
    parser.add_argument("--shard-size", type=int, help=f"samples per tar shard (default: {dflt('shard_size')})")
    parser.add_argument("--eval-samples", type=int, help=f"samples in the clean held-out eval split (default: {dflt('eval_samples')})")
    parser.add_argument("--image-size", type=int, help=f"image side in pixels, >= 8 (default: {dflt('image_size')})")
    parser.add_argument("--images", choices=tuple(IMAGE_SOURCES),
                        help=f"shapes: drawn coloured shapes, {classes['shapes']} classes; digits: scikit-learn's handwritten digits, "
                             f"coloured, {classes['digits']} classes; mixed: both, {classes['mixed']} classes (default: {dflt('images')})")
    parser.add_argument("--relabel", type=float,
                        help=f"fraction of the pool consistently relabelled one way (systematic noise), 0..1 (default: {dflt('relabel')})")
    parser.add_argument("--relabel-pairs", type=int,
                        help=f"class pairs the relabelling is spread over, each source -> target (default: {dflt('relabel_pairs')})")
    parser.add_argument("--workers", type=int, help="processes writing shards in parallel (default: CPU count)")
    add_print_config(parser)
    parser.set_defaults(func=run, parser=parser)


def run(args) -> int:
    import json

    from raymimic.app.options import build, given, print_config
    from raymimic_experiments.toy_pool import ToyPoolConfig

    cfg = build(args.parser, ToyPoolConfig, **given(args, OPTIONS))
    if args.print_config:
        return print_config(cfg)
    summary = cfg.write()
    print(json.dumps(summary, indent=2))
    print(f"wrote {summary['samples']} samples in {summary['shards']} shards to {summary['output']} in {summary['seconds']} s")
    return 0
