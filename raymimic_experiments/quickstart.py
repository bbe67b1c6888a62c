"""The whole raymimic flow on a toy pool with known noise, offline, on an embedded Ray.

1. write a toy pool (DataComp layout) with random caption noise *and* systematic noise (one
   class consistently captioned as another, over several class pairs: only a model that knows
   the classes from elsewhere can flag it), and a separate, larger clean pool;
2. train the reference model on the clean pool from *another* initialisation than the target,
   as public references are made;
3. Stage 1 twice, the same pool and reference: the *paper's mode* (Grad-Mimic re-weighting,
   mimic layer image-mlp, tau 0.05) and the *best mode* (``stage1_weighting``, the measured
   choice), both recording the controls and baselines beside the score;
4. Stage 2 on each: the paper's DataComp rules for the paper's mode (top 30% by mimic score;
   the pool's CLIP-score top 30% minus the mimic score's bottom 15%), the ensemble on
   ``filter_score_column`` for the best mode; each with its reference lift;
5. train the same model on the whole pool, on each mode's kept subset and on a
   CLIPScore-filtered subset of the best mode's size, evaluate on a held-out clean split;
6. the gate checks of the pool (does the reference's own loss flag the relabelled samples, and
   the target's not?), noise detection against the ground truth, and a Markdown report.

The ground truth is read only in step 6 (and by Stage 2's lift report): training and filtering never see it.
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
    """The quickstart's settings: pool sizes, the model and its training, the two modes of Stages 1 and 2."""

    output: str = "runs/quickstart"
    samples: int = 6000  # noisy pool size
    reference_samples: int = 9000  # clean pool the reference model trains on (larger, another seed)
    noise: float = 0.3  # fraction of randomly corrupted captions in the noisy pool
    relabel: float = 0.1  # fraction consistently relabelled, one way, over relabel_pairs class pairs (systematic noise)
    relabel_pairs: int = 4
    # 26 classes (shapes and handwritten digits): each relabelled class is small enough that the
    # relabelling is most of it, so the target learns it as signal (the pool's gate checks)
    images: str = "mixed"
    eval_samples: int = 1000  # clean held-out split for evaluation
    model: str = "raymimic-tiny"
    # epochs of every training run: enough for the tiny model to learn shapes, not only colours,
    # while the whole run stays short on a small machine (measurements: docs/)
    epochs: int = 10
    reference_epochs: int = 10
    reference_init: str = "other"  # "other": the reference starts from another seed, as public ones do; "same": the target's
    global_batch: int = 128
    lr: float = 2e-3
    tau: float = DEFAULT_TAU  # Grad-Mimic softmax temperature
    workers: int = 2  # Ray Train workers
    method: str = "ensemble"  # Stage-2 binarizer of the best mode, one of raymimic.select.mimic_filter.MIMIC_METHODS
    # The best mode: how Stage 1 weights the batch while it records the scores (a name of
    # raymimic.mimic.weighting.WEIGHTINGS) and which score column Stage 2 filters on; chosen from
    # the measured tables in docs/findings.md
    stage1_weighting: str = "sgd"
    filter_score_column: str = "ref_clipscore"
    # the quantity the binarizers fit: per-step standardised raw score (see select/binarize.py);
    # uniform-weight runs have B*w = 1 everywhere, so the weight itself carries nothing
    filter_feature: str | None = "step_z"
    # also run the paper's mode beside it: Grad-Mimic re-weighting, then each of paper_rules, the paper's DataComp
    # Stage 2 (names of raymimic.select.names.PAPER_DATACOMP_RULES)
    paper_mode: bool = True
    paper_rules: list[str] = field(default_factory=lambda: ["top30", "clip30-minus15"])
    controls: list[str] = field(default_factory=lambda: ["zero", "init", "random", "fixed", "aligned", "output"])
    baselines: list[str] = field(default_factory=lambda: ["loss", "ref_loss", "ref_clipscore"])
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
        if not 0 <= self.relabel < 1 or self.noise + self.relabel >= 1:
            raise ValueError(f"relabel is a fraction in [0, 1) and noise + relabel < 1, got relabel={self.relabel}, noise={self.noise}")
        from raymimic_experiments.toy_pool import IMAGE_SOURCES

        if self.images not in IMAGE_SOURCES:
            raise ValueError(f"images must be one of {list(IMAGE_SOURCES)}, got {self.images!r}")
        if self.reference_init not in ("other", "same"):
            raise ValueError(f"reference_init must be 'other' or 'same', got {self.reference_init!r}")
        if not self.tau > 0:
            raise ValueError(f"tau (the softmax temperature) must be > 0, got {self.tau}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        from raymimic.select.names import PAPER_DATACOMP_RULES

        unknown = [rule for rule in self.paper_rules if rule not in PAPER_DATACOMP_RULES]
        if unknown:
            raise ValueError(f"paper_rules {unknown} unknown; choose among {list(PAPER_DATACOMP_RULES)}")

    @property
    def reference_seed(self) -> int:
        return self.seed + 1 if self.reference_init == "other" else self.seed

    def mode_settings(self) -> dict[str, dict]:
        """Per mode: Stage 1's weighting and Stage 2's options."""
        modes = {"best": {"weighting": self.stage1_weighting,
                             "filter": {"method": self.method, "feature": self.filter_feature, "score_column": self.filter_score_column}}}
        for rule in self.paper_rules if self.paper_mode else []:
            modes[f"paper-{rule}"] = {"weighting": "grad-mimic", "filter": {"paper_datacomp": rule}}
        return modes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _log(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _train(cfg: QuickstartConfig, name: str, dataset, samples: int, epochs: int, reference: str | None, weighting: str,
           seed: int | None = None) -> str:
    from raymimic.train.config import TrainConfig
    from raymimic.train.trainer import fit

    steps = max(1, samples * epochs // cfg.global_batch)
    scoring = reference is not None
    train_cfg = TrainConfig(
        output=os.path.join(cfg.output, name), model=cfg.model, reference=reference, weighting=weighting, tau=cfg.tau,
        samples_seen=steps * cfg.global_batch, global_batch=cfg.global_batch, lr=cfg.lr, warmup=max(1, steps // 10),
        workers=cfg.workers, cpus_per_worker=0.5, checkpoint_every=steps, seed=cfg.seed if seed is None else seed,
        run_name="ray_train", progress=False, controls=list(cfg.controls) if scoring else [],
        baselines=list(cfg.baselines) if scoring else [], align_every=max(1, steps // 5),  # the aligned control: five fits per run
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


def _by_kind(truth, kept: set[str]) -> dict:
    """How many samples of each noise kind the selection kept."""
    kept_rows = truth[truth["uid"].isin(kept)]
    return {kind: int(n) for kind, n in kept_rows["kind"].value_counts().items()}


def gates(cfg: QuickstartConfig, pool: str, reference: str, target: str) -> dict:
    """The pool's gate checks (:func:`~raymimic_experiments.reference_lift.metrics.gate_checks`) from both models' own losses."""
    import pandas as pd

    from raymimic.clip import create_model
    from raymimic_experiments.reference_lift.data import load_split
    from raymimic_experiments.reference_lift.metrics import gate_checks
    from raymimic_experiments.reference_lift.train import per_sample_losses

    data = load_split(pool, cfg.model)
    truth = pd.read_parquet(os.path.join(pool, "ground_truth.parquet")).set_index("uid").loc[data.uids].reset_index()
    losses = {name: per_sample_losses(create_model(cfg.model, pretrained=path)[0], data, cfg.global_batch, cfg.seed)
              for name, path in (("reference", reference), ("target", target))}
    return gate_checks(truth, losses["reference"], losses["target"])


def run(cfg: QuickstartConfig) -> dict:
    import pandas as pd
    import ray

    from raymimic.clip.models import transforms_for_model
    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.data.uids import read_subset_uids, write_subset
    from raymimic.evaluate import evaluate
    from raymimic.select.pipeline import FilterConfig, run_filter
    from raymimic_experiments.reference_lift.metrics import format_gates
    from raymimic_experiments.toy_pool import make_toy_pool

    started = time.time()
    cfg.output = os.path.abspath(cfg.output)
    os.makedirs(cfg.output, exist_ok=True)
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    pool, ref_pool = os.path.join(cfg.output, "pool"), os.path.join(cfg.output, "reference_pool")
    truth_path = os.path.join(pool, "ground_truth.parquet")
    _log(f"writing toy pools under {cfg.output}")
    make_toy_pool(pool, samples=cfg.samples, noise=cfg.noise, seed=cfg.seed, shard_size=2000, eval_samples=cfg.eval_samples,
                  relabel=cfg.relabel, relabel_pairs=cfg.relabel_pairs, images=cfg.images)
    make_toy_pool(ref_pool, samples=cfg.reference_samples, noise=0.0, seed=cfg.seed + 100, shard_size=2000, eval_samples=0,
                  images=cfg.images)
    transforms = transforms_for_model(cfg.model)
    full = clip_training_dataset(pool, *transforms).materialize()
    results: dict = {"config": cfg.to_dict(), "modes": {}}

    _log(f"training the reference model on the clean pool ({cfg.reference_init} initialisation)")
    reference = _train(cfg, "reference", clip_training_dataset(ref_pool, *transforms).materialize(), cfg.reference_samples,
                       cfg.reference_epochs, None, "sgd", seed=cfg.reference_seed)
    truth = pd.read_parquet(truth_path)
    stage1: dict[str, str] = {}
    for mode, settings in cfg.mode_settings().items():
        weighting = settings["weighting"]
        if weighting not in stage1:
            _log(f"Stage 1 ({mode} mode): training with per-sample mimic scores, weighting {weighting}")
            stage1[weighting] = _train(cfg, f"stage1_{weighting}", full, cfg.samples, cfg.epochs, reference, weighting)
        _log(f"Stage 2 ({mode} mode): {settings['filter']}")
        out = os.path.join(cfg.output, f"filter_{mode}")
        summary = run_filter(FilterConfig(os.path.join(cfg.output, f"stage1_{weighting}", "scores"), out, pool=pool, report=True,
                                          gallery=True, ground_truth=truth_path, **settings["filter"]))
        kept = set(read_subset_uids(os.path.join(out, "keep.npy")))
        results["modes"][mode] = {
            "stage1_weighting": weighting, "filter": settings["filter"], "kept": len(kept), "uids": kept,
            "detection": detection_metrics(~truth["uid"].isin(kept).to_numpy(), truth["is_noisy"].to_numpy()),
            "kept_by_kind": _by_kind(truth, kept), "lift": summary.get("lift"), "quality": summary.get("quality"),
        }
        det = results["modes"][mode]["detection"]
        _log(f"{mode} mode: kept {len(kept)}, precision {det['precision']:.3f}, recall {det['recall']:.3f}, F1 {det['f1']:.3f}, "
             f"lift {_format_lift(_mode_lift(results['modes'][mode]))}")
    best = results["modes"]["best"]
    results["filter"] = {"kept": best["kept"], "quality": best["quality"]}
    results["detection"], results["lift"] = best["detection"], best["lift"]

    from raymimic.data.metadata import read_metadata

    metadata = read_metadata(pool, columns=["clip_b32_similarity_score"]).to_pandas()
    clip_kept = set(metadata.nlargest(best["kept"], "clip_b32_similarity_score")["uid"])
    write_subset(os.path.join(cfg.output, "clipscore_keep.npy"), clip_kept)
    results["detection_clipscore"] = detection_metrics(~truth["uid"].isin(clip_kept).to_numpy(), truth["is_noisy"].to_numpy())
    results["clipscore_kept_by_kind"] = _by_kind(truth, clip_kept)

    eval_ds, classnames, templates = _eval_split(pool)
    variants = {"whole pool": (full, cfg.samples)}
    variants.update({f"{mode} mode": (_subset(full, m["uids"]), m["kept"]) for mode, m in results["modes"].items()})
    variants["CLIPScore filter"] = (_subset(full, clip_kept), len(clip_kept))
    results["models"] = {}
    for name, (dataset, size) in variants.items():
        if size < cfg.global_batch:  # fewer samples than one batch: nothing to train on, say so instead of guessing
            results["models"][name] = {"samples": size, "skipped": f"kept {size} samples, fewer than one batch of {cfg.global_batch}"}
            _log(f"{name}: not trained, {results['models'][name]['skipped']}")
            continue
        _log(f"training on the {name} ({size} samples)")
        slug = name.lower().replace(" ", "_").replace(",", "")
        # same number of optimizer steps for every variant: only the data differs
        if name == "whole pool" and "sgd" in stage1:
            checkpoint = stage1["sgd"]  # a uniform-weight Stage 1 already was plain training on the whole pool
        else:
            checkpoint = _train(cfg, f"train_{slug}", dataset.materialize(), cfg.samples, cfg.epochs, None, "sgd")
        scores = evaluate(checkpoint, eval_ds, cfg.model, classnames=classnames, templates=templates)
        results["models"][name] = {**scores, "eval_samples": scores["samples"], "samples": size, "checkpoint": checkpoint}
        _log(f"{name}: zero-shot top-1 {results['models'][name]['zeroshot_top1']:.3f}")
    if cfg.relabel > 0:
        results["gates"] = gates(cfg, pool, reference, results["models"]["whole pool"]["checkpoint"])
        _log("gate checks of the pool:\n" + format_gates(results["gates"]))
    for mode in results["modes"].values():
        mode.pop("uids")
    results["seconds"] = round(time.time() - started, 1)
    report = write_report(cfg.output, results)
    _log(f"done in {results['seconds']:.0f}s; report: {report}")
    return results


def _bar_png(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["models"] if "skipped" not in results["models"][n]]
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

    from raymimic.select.mimic_filter import check_truth
    from raymimic.select.quality import LIFT_VALUE_PREFIX, lift_metrics

    if results.get("lift") is not None:
        return results["lift"]
    folder = next((os.path.join(output, name) for name in ("filter_best", "filter") if os.path.isdir(os.path.join(output, name))),
                  os.path.join(output, "filter"))  # "filter": runs written before the two modes
    summary_path = os.path.join(folder, "summary.json")
    summary = {}
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if (summary.get("lift") or {}).get("ground_truth"):
            return summary["lift"]
    decisions_path = os.path.join(folder, "decisions.parquet")
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


def _gate_lines(gates: dict | None) -> list[str]:
    if not gates:
        return []
    from raymimic_experiments.reference_lift.metrics import format_gates

    verdict = ("the pool needs a reference: only a model that learnt the classes elsewhere can flag the relabelled samples"
               if gates["passed"] else "a gate failed: on this pool the relabelled samples are not a test of the reference")
    return ["## Does this pool need a reference?", "", "```", format_gates(gates), "```", "", verdict + ".", ""]


def filter_column_lift(lift: dict | None, column: str) -> float | None:
    """The filter column's reference lift (:func:`raymimic.score_table.columns.reference_lift`) from a lift report's AUCs."""
    from raymimic.score_table.columns import reference_lift

    columns = (lift or {}).get("columns") or {}
    return reference_lift({c: row.get("auc") for c, row in columns.items()})["lifts"].get(column)


def _mode_lift(mode: dict) -> float | None:
    """The reference lift of the column a mode filters on."""
    column = mode["filter"].get("score_column", "score")
    return filter_column_lift(mode.get("lift"), column if column.startswith("score") else f"score_{column}")


def _format_lift(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _stage2_name(stage2: dict) -> str:
    """What a mode's Stage 2 did, in words."""
    from raymimic.select.names import PAPER_DATACOMP_RULES

    if stage2.get("paper_datacomp"):
        fraction, clip_top = PAPER_DATACOMP_RULES[stage2["paper_datacomp"]]
        if clip_top is None:
            return f"paper DataComp: top {fraction:.0%} by `score`"
        return f"paper DataComp: CLIPScore (L/14) top {clip_top:.0%} minus `score` bottom {1 - fraction:.0%}"
    if stage2.get("paper_rule"):
        return "label-noise simulation rule (binarize w)"
    return f"{stage2.get('method')} on `{stage2.get('score_column', 'score')}`"


def _mode_lines(results: dict) -> list[str]:
    """The paper's mode and the best mode side by side (detection, what each kept, reference lift)."""
    modes = results.get("modes")
    if not modes:
        return []
    lines = ["## The paper's mode and the best mode", "",
             "| mode | Stage 1 | Stage 2 | kept | precision | recall | F1 | relabelled kept | random noise kept | its lift (AUC) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, mode in modes.items():
        det, kinds = mode["detection"], mode.get("kept_by_kind", {})
        random_kept = sum(n for kind, n in kinds.items() if kind not in ("clean", "relabelled"))
        lines.append(f"| {name} | {mode['stage1_weighting']} | {_stage2_name(mode['filter'])} | {mode['kept']} | {det['precision']:.3f} "
                     f"| {det['recall']:.3f} | {det['f1']:.3f} | {kinds.get('relabelled', 0)} | {random_kept} "
                     f"| {_format_lift(_mode_lift(mode))} |")
    if "clipscore_kept_by_kind" in results:
        kinds, det = results["clipscore_kept_by_kind"], results["detection_clipscore"]
        random_kept = sum(n for kind, n in kinds.items() if kind not in ("clean", "relabelled"))
        lines.append(f"| CLIPScore, same size as best | | | {modes['best']['kept']} | {det['precision']:.3f} | {det['recall']:.3f} "
                     f"| {det['f1']:.3f} | {kinds.get('relabelled', 0)} | {random_kept} | |")
    return lines + ["", "Its lift: the AUC of the column the mode filters on minus the best among the columns computed without "
                    "the reference (the controls and the target's own loss `score_loss`; either sign); <= 0 means the reference "
                    "adds nothing measurable to that mode. The lift table below is the best mode's, and its headline lift is "
                    "always the mimic score's (`score`).", ""]


def write_report(output: str, results: dict) -> str:
    from raymimic.select.report import lift_lines

    results["lift"] = reference_lift(output, results)
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    _bar_png(results, os.path.join(output, "models.png"))
    det, clip_det = results["detection"], results["detection_clipscore"]
    lines = [
        "# raymimic quickstart", "",
        f"Toy pool: {results['config']['samples']} samples, {results['config']['noise']:.0%} randomly corrupted captions, "
        f"{results['config'].get('relabel', 0):.0%} consistently relabelled; "
        f"model `{results['config']['model']}`; finished in {results['seconds']:.0f} s.", "",
        "## Noise detection (dropped = predicted noisy)", "",
        "| filter | kept | precision | recall | F1 |", "|---|---|---|---|---|",
        f"| mimic ({results['config']['method']}) | {results['filter']['kept']} | {det['precision']:.3f} | {det['recall']:.3f} "
        f"| {det['f1']:.3f} |",
        f"| CLIPScore, same size | {results['filter']['kept']} | {clip_det['precision']:.3f} | {clip_det['recall']:.3f} "
        f"| {clip_det['f1']:.3f} |",
        "", f"Quality estimate of the pool (mimic filter): {json.dumps(results['filter']['quality'])}", "",
        *_gate_lines(results.get("gates")), *_mode_lines(results), *lift_lines(results["lift"]), "",
        "## Models trained on each subset (same number of steps)", "",
        "| training data | samples | zero-shot top-1 | top-5 | image->text R@1 | R@5 | text->image R@1 | R@5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        if "skipped" in m:
            lines.append(f"| {name} | {m['samples']} | not trained: {m['skipped']} | | | | | |")
            continue
        lines.append(f"| {name} | {m['samples']} | {m['zeroshot_top1']:.3f} | {m['zeroshot_top5']:.3f} | "
                     f"{m['image_to_text_recall@1']:.3f} | {m['image_to_text_recall@5']:.3f} | "
                     f"{m['text_to_image_recall@1']:.3f} | {m['text_to_image_recall@5']:.3f} |")
    lines += ["", "![models](models.png)", "", "Score histograms and the fitted mixtures: [filter/report.md](filter/report.md)", ""]
    galleries = [f"[{mode}](filter_{mode}/gallery.html)" for mode in results.get("modes", {})
                 if os.path.isfile(os.path.join(output, f"filter_{mode}", "gallery.html"))]
    if galleries:
        lines += ["What each mode dropped, left at the cut and kept, in pictures: " + ", ".join(galleries), ""]
    path = os.path.join(output, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
