"""The whole raymimic flow on a toy pool with known noise, offline, on an embedded Ray.

1. write a noisy toy pool (DataComp layout) and a separate clean pool for the reference;
2. train the reference model on the clean pool (plain training);
3. Stage 1: train on the noisy pool with Grad-Mimic, writing the score table;
4. Stage 2: the ensemble mimic filter -> keep.npy, decisions.parquet, summary.json, report;
5. train the same model on (a) the whole pool, (b) the mimic-filtered pool, (c) a
   CLIPScore-filtered pool of the same size;
6. evaluate each on the held-out clean split (zero-shot + retrieval), score the filter's
   noise detection against the ground truth, and write a Markdown report with plots.

The ground truth is read only in step 6: training and filtering never see it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from raymimic.train.config import DEFAULT_TAU


@dataclass
class QuickstartConfig:
    """The quickstart's settings: pool sizes, the model and its training, the Stage-2 filter."""

    output: str = "runs/quickstart"
    samples: int = 6000  # noisy pool size
    reference_samples: int = 6000  # clean pool the reference model trains on
    noise: float = 0.4  # fraction of corrupted captions in the noisy pool
    eval_samples: int = 1000  # clean held-out split for evaluation
    model: str = "raymimic-tiny"
    # epochs of every training run: enough for the tiny model to learn shapes, not only colours,
    # while the whole run stays short on a small machine (measurements: docs/)
    epochs: int = 10
    reference_epochs: int = 10
    global_batch: int = 128
    lr: float = 2e-3
    tau: float = DEFAULT_TAU  # Grad-Mimic softmax temperature
    workers: int = 2  # Ray Train workers
    method: str = "ensemble"  # Stage-2 binarizer, one of raymimic.select.mimic.MIMIC_METHODS
    # How Stage 1 weights the batch while it records the mimic scores (a name of
    # raymimic.mimic.weighting.WEIGHTINGS). "sgd" (uniform weights) by default: re-weighting
    # pulls the mimic layer toward the reference and the recorded scores then separate noisy
    # from clean captions less well (measurements: README and docs/); "grad-mimic" re-weights
    # online as the paper does.
    stage1_weighting: str = "sgd"
    # the quantity the binarizers fit: per-step standardised raw score (see select/binarize.py);
    # uniform-weight runs have B*w = 1 everywhere, so the weight itself carries nothing
    filter_feature: str | None = "step_z"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("samples", "reference_samples", "epochs", "reference_epochs", "global_batch", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1 (the models are evaluated on it), got {self.eval_samples}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise is a fraction in [0, 1), got {self.noise}")
        if not self.tau > 0:
            raise ValueError(f"tau (the softmax temperature) must be > 0, got {self.tau}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _log(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train(cfg: QuickstartConfig, name: str, dataset, samples: int, epochs: int, reference: str | None, weighting: str) -> str:
    from raymimic.train.config import TrainConfig
    from raymimic.train.trainer import fit

    steps = max(1, samples * epochs // cfg.global_batch)
    train_cfg = TrainConfig(
        output=os.path.join(cfg.output, name), model=cfg.model, reference=reference, weighting=weighting, tau=cfg.tau,
        samples_seen=steps * cfg.global_batch, global_batch=cfg.global_batch, lr=cfg.lr, warmup=max(1, steps // 10),
        workers=cfg.workers, cpus_per_worker=0.5, checkpoint_every=steps, seed=cfg.seed, run_name="ray_train", progress=False,
        shuffle_buffer=1000,  # seeded local shuffle: every sample lands in a full batch in some epoch
    )
    started = time.time()
    summary = fit(train_cfg, dataset)
    _log(f"{name}: {steps} steps in {time.time() - started:.0f}s, final loss {summary.metrics.get('loss', float('nan')):.3f}")
    return summary.final_checkpoint


def _subset(dataset, uids: set[str]):
    """Rows of ``dataset`` whose uid is in ``uids`` (a user's own Ray Data step would do the same)."""
    import pandas as pd

    def keep(batch: pd.DataFrame) -> pd.DataFrame:
        return batch[batch["uid"].isin(uids)]

    return dataset.map_batches(keep, batch_format="pandas")


def _eval_split(pool: str):
    from raymimic.data.pool import read_pool

    with open(os.path.join(pool, "eval", "classnames.json")) as f:
        classnames = json.load(f)
    with open(os.path.join(pool, "eval", "templates.json")) as f:
        templates = json.load(f)

    def label(batch):
        batch["label"] = np.array([json.loads(j)["cls"] for j in batch["json"]], dtype=np.int64)
        return batch

    ds = read_pool(os.path.join(pool, "eval"), columns=["uid", "text", "image", "json"]).map_batches(label, batch_format="numpy")
    return ds, classnames, templates


def detection_metrics(dropped: np.ndarray, noisy: np.ndarray) -> dict:
    """The report's row: :func:`raymimic.select.quality.detection_metrics` of the dropped set, counts as ``dropped``/``noisy``."""
    from raymimic.select.quality import detection_metrics as metrics

    m = metrics(~np.asarray(dropped, dtype=bool), noisy)
    return {"precision": m["precision"], "recall": m["recall"], "f1": m["f1"], "dropped": m["n_dropped"], "noisy": m["n_noisy"]}


def run(cfg: QuickstartConfig) -> dict:
    import pandas as pd
    import ray

    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.data.toy_pool import make_toy_pool
    from raymimic.data.uids import read_subset_uids, write_subset
    from raymimic.evaluate import evaluate
    from raymimic.select.pipeline import FilterConfig, run_filter

    started = time.time()
    cfg.output = os.path.abspath(cfg.output)
    os.makedirs(cfg.output, exist_ok=True)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    pool, ref_pool = os.path.join(cfg.output, "pool"), os.path.join(cfg.output, "reference_pool")
    _log(f"writing toy pools under {cfg.output}")
    make_toy_pool(pool, samples=cfg.samples, noise=cfg.noise, seed=cfg.seed, shard_size=2000, eval_samples=cfg.eval_samples)
    make_toy_pool(ref_pool, samples=cfg.reference_samples, noise=0.0, seed=cfg.seed + 1, shard_size=2000, eval_samples=0)
    full = clip_training_dataset(pool, cfg.model).materialize()
    results: dict = {"config": cfg.__dict__.copy()}

    _log("training the reference model on the clean pool")
    reference = _train(cfg, "reference", clip_training_dataset(ref_pool, cfg.model).materialize(), cfg.reference_samples,
                       cfg.reference_epochs, None, "sgd")
    _log(f"Stage 1: training with per-sample mimic scores (weighting: {cfg.stage1_weighting})")
    stage1 = _train(cfg, "stage1", full, cfg.samples, cfg.epochs, reference, cfg.stage1_weighting)
    _log("Stage 2: the mimic filter")
    filter_out = os.path.join(cfg.output, "filter")
    summary = run_filter(FilterConfig(os.path.join(cfg.output, "stage1", "scores"), filter_out, pool=pool, method=cfg.method,
                                      feature=cfg.filter_feature, report=True))
    kept = set(read_subset_uids(os.path.join(filter_out, "keep.npy")))
    results["filter"] = {"kept": len(kept), "fraction_kept": summary.get("fraction_kept"), "quality": summary.get("quality")}

    truth = pd.read_parquet(os.path.join(pool, "ground_truth.parquet"))
    results["detection"] = detection_metrics(~truth["uid"].isin(kept).to_numpy(), truth["is_noisy"].to_numpy())
    from raymimic.data.metadata import read_metadata

    metadata = read_metadata(pool, columns=["clip_b32_similarity_score"]).to_pandas()
    clip_kept = set(metadata.nlargest(len(kept), "clip_b32_similarity_score")["uid"])
    write_subset(os.path.join(cfg.output, "clipscore_keep.npy"), clip_kept)
    results["detection_clipscore"] = detection_metrics(~truth["uid"].isin(clip_kept).to_numpy(), truth["is_noisy"].to_numpy())

    eval_ds, classnames, templates = _eval_split(pool)
    variants = {"whole pool": full, "mimic filter": _subset(full, kept), "CLIPScore filter": _subset(full, clip_kept)}
    sizes = {"whole pool": cfg.samples, "mimic filter": len(kept), "CLIPScore filter": len(clip_kept)}
    results["models"] = {}
    for name, dataset in variants.items():
        _log(f"training on the {name} ({sizes[name]} samples)")
        slug = name.lower().replace(" ", "_")
        # same number of optimizer steps for every variant: only the data differs
        if name == "whole pool" and cfg.stage1_weighting == "sgd":
            checkpoint = stage1  # Stage 1 already was plain training on the whole pool
        else:
            checkpoint = _train(cfg, f"train_{slug}", dataset.materialize(), cfg.samples, cfg.epochs, None, "sgd")
        scores = evaluate(checkpoint, eval_ds, cfg.model, classnames=classnames, templates=templates)
        results["models"][name] = {**scores, "eval_samples": scores["samples"], "samples": sizes[name], "checkpoint": checkpoint}
        _log(f"{name}: zero-shot top-1 {results['models'][name]['zeroshot_top1']:.3f}")
    results["seconds"] = round(time.time() - started, 1)
    report = write_report(cfg.output, results)
    _log(f"done in {results['seconds']:.0f}s; report: {report}")
    return results


def _bar_png(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, key in ((-0.2, "zeroshot_top1"), (0.2, "image_to_text_recall@5")):
        ax.bar(np.arange(len(names)) + offset, [results["models"][n][key] for n in names], width=0.4, label=key)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out clean split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reference_lift(output: str, results: dict) -> dict | None:
    """The reference lift of the Stage-2 filter (:func:`raymimic.select.quality.lift_metrics`); None without control columns.

    ``results["lift"]`` when the run put one there; else the filter's ``summary.json`` lift when it
    was computed with the ground truth; else computed here from ``filter/decisions.parquet`` (its
    ``step_z_<column>`` columns, written when the score table has control columns) and the toy
    pool's ``ground_truth.parquet`` (every scored uid: no sampling).
    """
    import pandas as pd

    from raymimic.select.mimic import check_truth
    from raymimic.select.quality import LIFT_VALUE_PREFIX, lift_metrics

    if results.get("lift") is not None:
        return results["lift"]
    summary_path = os.path.join(output, "filter", "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if (summary.get("lift") or {}).get("ground_truth"):
            return summary["lift"]
    decisions_path = os.path.join(output, "filter", "decisions.parquet")
    if not os.path.exists(decisions_path):
        return None
    decisions = pd.read_parquet(decisions_path)
    value_columns = [c for c in decisions.columns if c.startswith(LIFT_VALUE_PREFIX)]
    if len(value_columns) < 2:  # the reference's own column alone: no control recorded
        return None
    if "mimic_scored" in decisions:
        decisions = decisions[decisions["mimic_scored"].to_numpy() == 1]
    truth_path, is_noisy = os.path.join(output, "pool", "ground_truth.parquet"), None
    if os.path.exists(truth_path):
        decisions = decisions.merge(check_truth(pd.read_parquet(truth_path)), on="uid", how="inner")
        is_noisy = decisions["is_noisy"].to_numpy(bool)
    values = {c[len(LIFT_VALUE_PREFIX):]: decisions[c].to_numpy(np.float64) for c in value_columns}
    lift = lift_metrics(values, decisions["mimic_keep"].to_numpy(bool), summary.get("score_column", "score"), is_noisy)
    lift.update(n_uids_total=len(decisions), sampled=False)
    return lift


def write_report(output: str, results: dict) -> str:
    from raymimic.select.report import lift_lines

    results["lift"] = reference_lift(output, results)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    _bar_png(results, os.path.join(output, "models.png"))
    det, clip_det = results["detection"], results["detection_clipscore"]
    lines = [
        "# raymimic quickstart", "",
        f"Toy pool: {results['config']['samples']} samples, {results['config']['noise']:.0%} noisy captions; "
        f"model `{results['config']['model']}`; finished in {results['seconds']:.0f} s.", "",
        "## Noise detection (dropped = predicted noisy)", "",
        "| filter | kept | precision | recall | F1 |", "|---|---|---|---|---|",
        f"| mimic ({results['config']['method']}) | {results['filter']['kept']} | {det['precision']:.3f} | {det['recall']:.3f} "
        f"| {det['f1']:.3f} |",
        f"| CLIPScore, same size | {results['filter']['kept']} | {clip_det['precision']:.3f} | {clip_det['recall']:.3f} "
        f"| {clip_det['f1']:.3f} |",
        "", f"Quality estimate of the pool (mimic filter): {json.dumps(results['filter']['quality'])}", "",
        *lift_lines(results["lift"]), "",
        "## Models trained on each subset (same number of steps)", "",
        "| training data | samples | zero-shot top-1 | top-5 | image->text R@1 | R@5 | text->image R@1 | R@5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} | {m['samples']} | {m['zeroshot_top1']:.3f} | {m['zeroshot_top5']:.3f} | "
                     f"{m['image_to_text_recall@1']:.3f} | {m['image_to_text_recall@5']:.3f} | "
                     f"{m['text_to_image_recall@1']:.3f} | {m['text_to_image_recall@5']:.3f} |")
    lines += ["", "![models](models.png)", "", "Score histograms and the fitted mixtures: [filter/report.md](filter/report.md)", ""]
    path = os.path.join(output, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
