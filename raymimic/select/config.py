"""Stage 2's settings as a plain dataclass: the command line reads its defaults without pandas or Ray.

:class:`FilterConfig` is what :func:`raymimic.select.pipeline.run_filter` runs; the names of
its choices are in :mod:`raymimic.select.names`. Building one checks it with Stage 2's own
validators (imported then).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from raymimic.select.names import DUPLICATE_HANDLING, FEATURES, MIMIC_METHODS, MISSING_HANDLING, NAN_HANDLING, PAPER_DATACOMP_RULES


@dataclass
class FilterConfig:
    """Stage 2 (:func:`raymimic.select.pipeline.run_filter`): score tables in, a DataComp subset and its decisions out."""

    scores: str  # score tables: RUN/scores, a directory of parquet files (local path or fsspec URI)
    output: str  # output directory (local path or fsspec URI)
    pool: str | None = None  # DataComp pool root: join its metadata on uid (clip_top, min_clip_score, basic need it)
    method: str = "gmm"  # one of MIMIC_METHODS
    feature: str | None = None  # what the binarizers fit (FEATURES); None = the method's default
    rule: str | float = "majority"  # vote across epochs and methods: majority, all, any or a fraction in (0, 1]
    fraction: float = 0.3  # top-fraction: share of uids to keep
    fit_sample: int = 100_000  # rows sampled at random to fit the binarizers
    seed: int = 0
    nan: str = "drop"  # one of NAN_HANDLING
    duplicates: str = "error"  # one of DUPLICATE_HANDLING
    missing: str = "drop"  # one of MISSING_HANDLING: pool uids without any score
    clip_top: float | None = None  # with a pool: also keep only this top fraction by CLIP score
    min_clip_score: float | None = None  # with a pool: also keep only CLIP score >= this
    clip_column: str = "clip_l14_similarity_score"
    basic: bool = False  # with a pool: also apply DataComp basic filtering
    language_model: str | None = None  # fastText language-id model for basic's English check
    report: bool = False  # also write report.md with histograms
    # the column in the raw score's role: score, score_<name> or a bare control name (zero -> score_zero)
    score_column: str = "score"
    # the paper's label-noise simulation rule: every binarizer on w_i (threshold B*w > 1, GMM/k-means on B*w)
    paper_rule: bool = False
    # one of PAPER_DATACOMP_RULES, the paper's DataComp Stage 2: sets method top-fraction, fraction and clip_top
    paper_datacomp: str | None = None
    ground_truth: str | None = None  # parquet with uid and boolean is_noisy: ROC-AUC, F1 and the reference lift in summary.json
    gallery: bool = False  # also write gallery.html: thumbnails of dropped, borderline and kept samples from the pool
    overwrite: bool = False  # start afresh even when --output holds an unfinished run of other inputs or settings
    # custom Ray resources each Ray task of Stage 2 asks for besides its CPU, e.g. {"cpu_node": 1}: the nodes it may run on
    task_resources: dict[str, float] | None = None

    def __post_init__(self):
        from raymimic.select.ensemble import check_rule
        from raymimic.select.mimic_filter import check_feature_choice, check_task_resources, resolve_score_column

        for name in ("scores", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.paper_datacomp is not None:
            self._apply_paper_datacomp()
        if self.method not in MIMIC_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(MIMIC_METHODS)}")
        if self.feature is not None and self.feature not in FEATURES:
            raise ValueError(f"unknown feature {self.feature!r}; choose one of {list(FEATURES)}")
        self.score_column = resolve_score_column(self.score_column)
        check_feature_choice(self.method, self.feature, self.score_column, self.paper_rule)
        self.rule = check_rule(self.rule)
        self.task_resources = check_task_resources(self.task_resources)
        if self.method == "top-fraction" and not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1] for top-fraction, got {self.fraction}")
        if self.fit_sample < 2:
            raise ValueError(f"fit_sample must be at least 2 rows, got {self.fit_sample}")
        for name, allowed in (("nan", NAN_HANDLING), ("duplicates", DUPLICATE_HANDLING), ("missing", MISSING_HANDLING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; use one of {list(allowed)}")
        if self.clip_top is not None and not 0 < self.clip_top <= 1:
            raise ValueError(f"clip_top is a fraction in (0, 1], got {self.clip_top}")
        needs_pool = self.clip_top is not None or self.min_clip_score is not None or self.basic
        if needs_pool and self.pool is None:
            raise ValueError("--clip-top, --min-clip-score and --basic read the pool's metadata: give --pool")
        if self.gallery and self.pool is None:
            raise ValueError("--gallery shows the pool's images: give --pool")

    def _apply_paper_datacomp(self) -> None:
        """Expand the named rule of the paper's DataComp Stage 2 into method, fraction and clip_top."""
        if self.paper_datacomp not in PAPER_DATACOMP_RULES:
            raise ValueError(f"unknown paper_datacomp rule {self.paper_datacomp!r}; choose one of {list(PAPER_DATACOMP_RULES)}")
        if self.paper_rule:
            raise ValueError("--paper-datacomp (the paper's DataComp rules) and --paper-rule (its label-noise simulation rule) "
                             "are two different rules: give one")
        fraction, clip_top = PAPER_DATACOMP_RULES[self.paper_datacomp]
        if clip_top is not None and self.pool is None:
            raise ValueError(f"--paper-datacomp {self.paper_datacomp} keeps the pool's CLIP-score top {clip_top:.0%}: give --pool")
        if self.clip_top is not None and self.clip_top != clip_top:
            raise ValueError(f"--paper-datacomp {self.paper_datacomp} sets the CLIP-score rule itself "
                             f"({'none' if clip_top is None else clip_top}): drop --clip-top {self.clip_top}")
        self.method, self.fraction, self.clip_top = "top-fraction", fraction, clip_top

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
