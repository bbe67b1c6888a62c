"""The Stage-1 job command line, shared by ``jobs/datacomp_*.py`` and ``raymimic train``.

A job reads a DataComp pool (``--pool``, any fsspec URI) through Ray Data, trains CLIP on Ray
Train while scoring every sample against the reference (``--weighting grad-mimic`` also
re-weights each batch, as the paper does) and writes ``<output>/scores/`` (the score table),
``<output>/checkpoints/final.pt`` (open_clip format) and ``<output>/ray_train/`` (resumable
checkpoints). ``--smoke`` runs the same code for a few steps on a toy pool it writes itself.

Options default to ``None``: the config is ``TrainConfig.from_preset(preset, **given)`` where
``given`` holds only the options on the command line, so a preset fills everything else.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from raymimic.app.options import (
    MIMIC_LAYER_ALIASES,
    WEIGHTINGS,
    add_lazy,
    add_print_config,
    build,
    default,
    fail,
    given,
    print_config,
    resources_option,
)
from raymimic.train.config import BASELINES, BUILTIN_CONTROLS, DIRECTIONS, PRECISIONS, PRESETS, SCORE_KINDS, TrainConfig

WEIGHTING_HELP = (
    "batch weighting while the scores are recorded, one of %(choices)s: sgd (uniform weights: the scores are recorded along "
    "a standard training run; the default, since re-weighting the batch was measured to make the recorded scores worse "
    "selectors, see the README), grad-mimic (softmax of the mimic scores, the paper's training procedure; needed for "
    "'raymimic filter --paper-rule', the paper's label-noise simulation rule, and what --paper-datacomp assumes), "
    "grad-norm (softmax of the mimic layer's per-sample gradient norms), "
    "agra (equal weight to samples agreeing with the previous step's batch gradient), rho (softmax of loss minus the reference "
    "model's loss; runs the reference model forward), grad-match (weights matching the batch gradient, solved on each "
    "worker's LOCAL Gram matrix) (default: {default})"
)

# option dest -> TrainConfig field, for every option that is a field (the rest are the same name)
RENAME = {"gpu": "use_gpu"}
FIELD_OPTIONS = (
    "pool", "reference", "output", "shuffle_buffer", "model", "pretrained", "samples_seen", "global_batch", "lr", "warmup",
    "weight_decay", "precision", "grad_checkpointing", "weighting", "mimic_layer", "tau", "score_kind", "reweight_all", "workers",
    "min_workers", "max_workers", "gpu", "cpus_per_worker", "checkpoint_every", "max_failures", "seed", "direction", "controls",
    "baselines", "align_every", "collective_timeout_s", "resources_per_worker", "init_seed",
)
CONTROLS_HELP = (
    "comma-separated control directions, each scored from the same backward pass into a column score_<name> (one more matmul "
    "each; they never change the weights): {builtins}: zero (V = -W_t, the target model alone), init (W_0 - W_t), random "
    "(R - W_t, R seeded by --seed with the reference's norm), fixed (W_ref - W_0), current (W_ref - W_t, for --direction fixed), "
    "aligned (W_ref' - W_t, the reference brought into the target's basis from both models' activations, refitted every "
    "--align-every steps; it runs the reference forward then), function (V_fn = -dD/dW: how the layer must move for the "
    "target's batch similarity distributions to match the reference's; the reference forward and a backward of D down to the "
    "layer), output (the same question asked of the batch's logits directly, no layer and no backward: does descending the "
    "sample's loss move the logits the way matching the reference would; the reference forward), or "
    "NAME=SPEC (W_ref' - W_t for another reference, SPEC as "
    "--reference takes); 'none' for no controls (default: {default}; "
    "without --reference none, and fixed is left out under --direction fixed)"
)
BASELINES_HELP = (
    "comma-separated per-sample baselines recorded as columns score_<name>, higher = more likely kept: {names}: loss "
    "(score_loss = -loss, small-loss selection), ref_loss (-reference loss), rho (loss - reference loss, RHO-loss's sign), "
    "ref_clipscore (cosine of the reference's image and text embeddings); all but loss run the reference forward "
    "(default: none)"
)
# what --smoke changes on top of the tiny preset (options given on the command line still win)
SMOKE = {"workers": 2, "use_gpu": False, "cpus_per_worker": 0.5, "checkpoint_every": 4}
SMOKE_POOL = {"samples": 48, "noise": 0.3, "shard_size": 16, "eval_samples": 0, "workers": 1}


def _default(name: str):
    return default(TrainConfig, name)


def add_train_arguments(parser: argparse.ArgumentParser, preset: str, preset_is_option: bool = False) -> None:
    """The job's options; ``preset`` is the one whose values the help shows as defaults."""
    p = PRESETS[preset]
    of_preset = "the preset's, " if preset_is_option else ""

    def preset_default(key: str, fmt: str = "") -> str:
        return f"(default: {of_preset}{preset}: {p[key]:{fmt}})"

    data = parser.add_argument_group("data and outputs")
    data.add_argument("--pool", help="DataComp pool: local folder or fsspec URI holding shards/{:08d}.tar (required unless --smoke)")
    data.add_argument("--reference", help="reference model whose weights the run mimics: MODEL:TAG (e.g. ViT-B-32:datacomp_m_s128m_b4k), "
                      "a pretrained tag of --model, a local checkpoint or an fsspec URI; its architecture must equal --model's "
                      "(required, except for plain training: --weighting sgd without --reference)")
    data.add_argument("--output", help="run folder, local path or fsspec URI (required; with --smoke the default is a new temporary "
                      "folder); rerunning with the same --output resumes from its latest checkpoint")
    data.add_argument("--shuffle-buffer", type=int,
                      help=f"rows in each worker's local shuffle buffer (default: {_default('shuffle_buffer')}: pool order)")
    model = parser.add_argument_group("model and recipe (defaults: the preset)")
    model.add_argument("--model", help=f"open_clip model name {preset_default('model')}")
    model.add_argument("--pretrained", help="initial weights (tag, path or URI); default: random initialisation as DataComp")
    model.add_argument("--samples-seen", type=int,
                       help=f"training samples seen in total, >= --global-batch {preset_default('samples_seen', ',')}")
    model.add_argument("--global-batch", type=int, help=f"global batch over all workers {preset_default('global_batch')}")
    model.add_argument("--lr", type=float, help=f"peak learning rate of the cosine schedule {preset_default('lr')}")
    model.add_argument("--warmup", type=int, help=f"linear warm-up steps {preset_default('warmup')}")
    model.add_argument("--weight-decay", type=float,
                       help=f"AdamW weight decay, not on gains/biases/logit scale (default: {_default('weight_decay')})")
    model.add_argument("--precision", choices=PRECISIONS,
                       help=f"auto: bf16 autocast on GPU, fp32 on CPU (default: {_default('precision')})")
    model.add_argument("--grad-checkpointing", action="store_true", default=None, help="recompute activations in backward to save memory")
    mimic = parser.add_argument_group("mimic scoring")
    mimic.add_argument("--weighting", choices=WEIGHTINGS, metavar="WEIGHTING", help=WEIGHTING_HELP.format(default=_default("weighting")))
    add_lazy(mimic, "--mimic-layer", names=MIMIC_LAYER_ALIASES,
                   help=f"the layer whose reference direction scores the samples: an alias (%(names)s) or any 2-D parameter "
                        f"name of the model (default: {_default('mimic_layer')})")
    mimic.add_argument("--tau", type=float, help=f"softmax temperature of the weights, > 0 (default: {_default('tau')})")
    mimic.add_argument("--score-kind", choices=SCORE_KINDS,
                       help=f"proj: <-g_i,V>/||V||; cos: also divided by ||g_i|| (default: {_default('score_kind')})")
    mimic.add_argument("--reweight-all", action="store_true", default=None,
                       help="re-weight every layer's gradient, not only the mimic layer's (a second backward pass)")
    mimic.add_argument("--direction", choices=DIRECTIONS,
                       help=f"the score's direction: current = W_ref - W_t every step (the paper), fixed = W_ref - W_0, "
                            "function = V_fn = -dD/dW, with D the KL of the reference's softmax over the batch's image-text "
                            "similarities against the target's (its knowledge read from its outputs, whatever its "
                            f"initialisation) (default: {_default('direction')})")
    mimic.add_argument("--controls", metavar="LIST",
                       help=CONTROLS_HELP.format(builtins=", ".join(BUILTIN_CONTROLS), default=",".join(_default("controls"))))
    mimic.add_argument("--baselines", metavar="LIST", help=BASELINES_HELP.format(names=", ".join(BASELINES)))
    mimic.add_argument("--align-every", type=int,
                       help="steps between re-alignments of the 'aligned' control to the target's basis "
                            f"(default: {_default('align_every')})")
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--workers", type=int, help=f"data-parallel training workers (default: {_default('workers')})")
    cluster.add_argument("--min-workers", type=int, help="elastic training: fewest workers to run with (with --max-workers)")
    cluster.add_argument("--max-workers", type=int, help="elastic training: most workers to grow to")
    cluster.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker (default: CPU workers)")
    cluster.add_argument("--cpus-per-worker", type=float,
                         help=f"CPUs reserved per training worker (default: {_default('cpus_per_worker')})")
    cluster.add_argument("--checkpoint-every", type=int,
                         help=f"steps between checkpoints (default: {_default('checkpoint_every')}: five per run)")
    cluster.add_argument("--max-failures", type=int,
                         help=f"worker failures to recover from by resuming (default: {_default('max_failures')})")
    cluster.add_argument("--collective-timeout-s", type=float,
                         help="seconds a worker may wait in a collective (e.g. for a dead peer) before the run fails "
                              f"(default: {_default('collective_timeout_s')})")
    cluster.add_argument("--resources-per-worker", type=resources_option, metavar="NAME=AMOUNT[,...]",
                         help="custom Ray resources each training worker asks for besides CPU and GPU, e.g. trainer_slot=1 "
                              "to place workers on one node type (default: none)")
    cluster.add_argument("--seed", type=int, help=f"initialisation and shuffle seed (default: {_default('seed')})")
    model.add_argument("--init-seed", type=int, metavar="SEED",
                       help="build the target from this seed as open_clip's training app (open_clip_train) does: with the --seed a "
                            "reference was trained with, and the same architecture, open_clip and torch versions, the target starts "
                            "from the reference's own initialisation, so W_ref - W_t is in one basis (default: --seed)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of the same job on the tiny preset and a toy pool written under "
                        "<output>/toy_pool, 2 local CPU workers, a random reference unless --reference is given: checks the whole path "
                        "quickly; options given still override")
    add_print_config(parser)


def resolve_config(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: str) -> TrainConfig:
    """The one TrainConfig of this command line: ``preset`` (``tiny`` with --smoke) plus the options given.

    Command-line mistakes end in ``error: ...`` and exit status 2.
    """
    from raymimic.train.trainer import normalise_output

    preset = getattr(args, "preset", None) or ("tiny" if args.smoke else preset)
    overrides = given(args, FIELD_OPTIONS, RENAME)
    output = overrides.pop("output", None)
    if output is None:
        if not args.smoke:
            fail(parser, "--output is required: the run folder (local path or fsspec URI) for scores/ and checkpoints/")
        if args.print_config:
            output = os.path.join(tempfile.gettempdir(), "raymimic-smoke-NEW")  # made when the job runs
        else:
            output = tempfile.mkdtemp(prefix="raymimic-smoke-")
            print(f"no --output given: writing to {output}")
    output = normalise_output(output)
    if args.smoke:
        smoke = {**SMOKE, "pool": os.path.join(output, "toy_pool"), "reference": os.path.join(output, "reference.pt")}
        overrides = {**smoke, **overrides}
    elif "pool" not in overrides:
        fail(parser, "--pool is required (a DataComp pool folder or fsspec URI), or use --smoke")
    if "reference" not in overrides and "weighting" not in overrides:
        # the default weighting (uniform) would otherwise train without scoring anything
        fail(parser, "--reference is required: the model whose weights the scores point toward (MODEL:TAG, tag, path or URI); "
                     "for plain training without scores give --weighting sgd without --reference")
    return build(parser, TrainConfig.from_preset, preset, output=output, **overrides)


def _prepare_smoke(cfg: TrainConfig) -> None:
    """The toy pool and (unless the user named one) the random reference that --smoke trains with."""
    import torch

    from raymimic.clip import create_model, save_checkpoint
    from raymimic_experiments.toy_pool import make_toy_pool

    if not os.path.isdir(os.path.join(cfg.pool, "shards")):
        make_toy_pool(cfg.pool, seed=cfg.seed, **SMOKE_POOL)
    if cfg.reference == os.path.join(cfg.output, "reference.pt"):
        torch.manual_seed(cfg.seed + 1)
        save_checkpoint(create_model(cfg.model)[0], cfg.reference, cfg.model)


def run_job(parser: argparse.ArgumentParser, args: argparse.Namespace, preset: str) -> int:
    cfg = resolve_config(parser, args, preset)
    if args.print_config:
        return print_config(cfg)
    import ray

    from raymimic.score_table import count_rows
    from raymimic.train.config import parse_control
    from raymimic.train.preflight import PreflightError, check_run
    from raymimic.train.trainer import run_training

    if args.smoke:
        _prepare_smoke(cfg)
    try:
        check_run(cfg)  # settings, model, mimic layer, reference, pool, output: before Ray starts any work
    except PreflightError as error:
        fail(parser, str(error))
    if not ray.is_initialized():
        ray.init()
    try:
        summary = run_training(cfg, validate=False)  # check_run passed above
    except PreflightError as error:  # the cluster cannot host the run (found before training starts)
        fail(parser, str(error))
    print(f"trained {summary.metrics.get('step')} steps of {cfg.global_batch} samples on {cfg.workers} workers")
    extra = [f"score_{parse_control(c)[0]}" for c in cfg.controls] + [f"score_{b}" for b in cfg.baselines]
    columns = ", ".join(["uid", "step", "epoch", "rank", "score", "weight", "batch_size", *extra])
    print(f"score table: {summary.scores} ({count_rows(summary.scores)} rows: {columns})")
    print(f"final model (open_clip checkpoint): {summary.final_checkpoint}")
    print(f"resumable Ray Train checkpoint: {summary.ray_checkpoint}")
    return 0


def build_parser(preset: str, prog: str | None = None) -> argparse.ArgumentParser:
    p = PRESETS[preset]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Stage 1 at DataComp's {preset} scale: train {p['model']} on {p['samples_seen']:,} samples "
            f"(global batch {p['global_batch']}, lr {p['lr']}, warm-up {p['warmup']}, AdamW wd {_default('weight_decay')} "
            f"beta2 {_default('beta2')}, cosine) on Ray Train, scoring every sample at every step by how well its gradient "
            "points toward the reference model's weights (the mimic score; --weighting grad-mimic also re-weights each batch "
            "by it, as the paper does). "
            "Writes OUTPUT/scores/*.parquet (one row per sample per step), OUTPUT/checkpoints/final.pt (open_clip format) "
            "and OUTPUT/ray_train/ (resumable checkpoints)."
        ),
        epilog=(
            "example:\n  ray job submit --working-dir . -- python jobs/datacomp_medium.py "
            "--pool s3://bucket/pool --reference ViT-B-32:datacomp_m_s128m_b4k --output s3://bucket/runs/m1 --workers 8 --gpu\n"
            "smoke test:\n  python jobs/datacomp_small.py --smoke\n"
            "see the resolved settings without running:\n  python jobs/datacomp_small.py --pool P --reference R --output O --print-config"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser, preset)
    return parser


def main(preset: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(preset, prog)
    return run_job(parser, parser.parse_args(argv), preset)
