"""Detection metrics of score rows against a toy pool's ground truth, and the gate checks of a pool that needs a reference.

Every column is aggregated as Stage 2 does (per-step standardised, averaged per uid; higher =
keep) and scored by :func:`raymimic.select.quality.drop_auc` on three questions:

- ``random``: randomly corrupted captions vs every clean sample;
- ``systematic``: relabelled samples vs clean samples *of the same image classes* (the class
  confound: a score that only disliked those classes would look good against all clean samples);
- ``all``: any noise vs clean.

The *reference lift* of a column on a question is the library's one definition
(:func:`raymimic.score_table.columns.reference_lift`): its AUC minus the best among the columns
computed without the reference (the controls and the target's own loss), either sign.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from raymimic.score_table.columns import PRIMARY, control_name, reference_lift
from raymimic.select.quality import drop_auc
from raymimic_experiments.toy_pool import RELABELLED


def score_columns(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c == PRIMARY or control_name(c)]


def per_uid(rows: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """Per uid, each column's mean per-step standardised value (Stage 2's ``step_z``)."""
    columns = columns or score_columns(rows)
    grouped = rows.groupby("step")[columns]
    z = (rows[columns] - grouped.transform("mean")) / grouped.transform("std").replace(0, np.nan)
    z["uid"] = rows["uid"].to_numpy()
    return z.groupby("uid").mean()


def question_masks(truth: pd.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per question, (rows taking part, is_noisy) over ``truth`` (one row per uid)."""
    kind = truth["kind"].to_numpy()
    clean, relabelled = kind == "clean", kind == RELABELLED
    random_noise = ~clean & ~relabelled
    source_classes = set(truth.loc[relabelled, "class_name"])
    same_classes = truth["class_name"].isin(source_classes).to_numpy()
    return {
        "random": (clean | random_noise, random_noise),
        "systematic": ((clean & same_classes) | relabelled, relabelled),
        "all": (np.ones(len(kind), bool), ~clean),
    }


def detection_aucs(values: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """AUC of every column of ``values`` (per uid) on every question the pool supports; rows = columns."""
    truth = truth.set_index("uid").loc[values.index].reset_index()
    table = {}
    for question, (rows, noisy) in question_masks(truth).items():
        table[question] = {c: drop_auc(values[c].to_numpy()[rows], noisy[rows]) for c in values.columns}
    return pd.DataFrame(table)


def lift(aucs: pd.DataFrame, column: str) -> dict[str, float | None]:
    """Per question, ``column``'s reference lift (:func:`~raymimic.score_table.columns.reference_lift`); None where undefined."""
    return {question: reference_lift(aucs[question].to_dict())["lifts"].get(column) for question in aucs.columns}


def gate_checks(truth: pd.DataFrame, reference_loss: np.ndarray, target_loss: np.ndarray, *,
                reference_min: float = 0.8, target_max: float = 0.65) -> dict:
    """Does the pool need a reference? The reference's own loss must flag the relabelled samples, the target's must not.

    ``*_loss``: per sample of ``truth`` (same order). AUCs on the ``systematic`` question.
    """
    rows, noisy = question_masks(truth)["systematic"]
    if not noisy.any():
        raise ValueError("the pool has no relabelled samples: generate it with relabel > 0")
    reference_auc = drop_auc(-np.asarray(reference_loss)[rows], noisy[rows])
    target_auc = drop_auc(-np.asarray(target_loss)[rows], noisy[rows])
    return {
        "reference_loss_auc": reference_auc, "target_loss_auc": target_auc,
        "reference_flags_relabelled": bool(reference_auc >= reference_min),
        "target_does_not": bool(target_auc <= target_max),
        "passed": bool(reference_auc >= reference_min and target_auc <= target_max),
        "thresholds": {"reference_min": reference_min, "target_max": target_max},
    }


def format_gates(gates: dict) -> str:
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    return (f"gate 1 [{mark(gates['reference_flags_relabelled'])}] the reference's own loss flags the relabelled samples: "
            f"AUC {gates['reference_loss_auc']:.3f} (>= {gates['thresholds']['reference_min']})\n"
            f"gate 2 [{mark(gates['target_does_not'])}] the target's final loss does not: "
            f"AUC {gates['target_loss_auc']:.3f} (<= {gates['thresholds']['target_max']})")


def filter_detection(rows: pd.DataFrame, truth: pd.DataFrame, score_column: str = "score", method: str = "ensemble",
                     paper_rule: bool = False) -> dict:
    """Run the Stage-2 filter (local path) on ``rows``; precision/recall/F1 of its dropped set and the kept uids."""
    from raymimic.select.mimic_filter import MimicFilter
    from raymimic.select.quality import detection_metrics

    mimic = MimicFilter(rows, method=method, score_column=score_column, paper_rule=paper_rule, unfit="skip", lift=False).fit()
    decisions = mimic.decisions.set_index("uid")
    keep = decisions["mimic_keep"].reindex(truth["uid"]).fillna(False).to_numpy(bool)
    metrics = detection_metrics(keep, (truth["kind"] != "clean").to_numpy())
    return {**metrics, "kept": int(keep.sum()), "keep": keep}


def evaluate_model(model, model_name: str, data, classnames: list[str], templates: list[str], batch: int = 256) -> dict[str, float]:
    """Zero-shot top-1 / top-5 accuracy and image<->text retrieval recall@5 of ``model`` on ``data`` (a labelled, captioned
    :class:`~.data.PoolTensors`, e.g. the pool's clean held-out split). Retrieval pairs each image with its own caption."""
    import torch

    from raymimic.clip.embed import ClipEmbedder
    from raymimic.clip.models import get_tokenizer
    from raymimic.evaluate import retrieval_recall

    embedder = ClipEmbedder(model, get_tokenizer(model_name))  # the trained model in place of a loaded one
    try:
        classes = embedder.embed_classes(classnames, templates)
        with torch.no_grad():
            images = torch.cat([model.encode_image(data.images[s:s + batch], normalize=True) for s in range(0, len(data), batch)])
            texts = torch.cat([model.encode_text(data.texts[s:s + batch], normalize=True) for s in range(0, len(data), batch)])
        logits = images @ classes.t()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.numpy()
    finally:
        model.train()
    labels = np.asarray(data.labels)
    recall = retrieval_recall(images.numpy(), texts.numpy(), ks=(5,))
    return {"top1": float((top[:, 0] == labels).mean()), "top5": float((top == labels[:, None]).any(axis=1).mean()),
            "image_to_text_r5": recall["image_to_text_recall@5"], "text_to_image_r5": recall["text_to_image_recall@5"]}


def steps_to_reach(curve: list[dict], target: float, metric: str = "top1") -> int | None:
    """The first evaluated step of ``curve`` (``[{"step": s, metric: v, ...}]``) whose ``metric`` reaches ``target``; None if none does."""
    for point in sorted(curve, key=lambda p: p["step"]):
        if point[metric] >= target:
            return int(point["step"])
    return None


def seen_aucs(values: pd.DataFrame, seen_uids: set[str]) -> dict[str, float]:
    """Per column of ``values`` (per uid, higher = keep), the AUC of telling the uids a reference was trained on from the rest."""
    from raymimic.select.quality import drop_auc

    unseen = ~values.index.isin(list(seen_uids))  # drop_auc scores how well a LOW value flags the positives
    return {column: drop_auc(values[column].to_numpy(), unseen) for column in values.columns}
