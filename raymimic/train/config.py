"""Stage-1 training settings: one dataclass, and DataComp's scales as plain data.

A preset fills the model, the number of samples seen, the global batch, the learning rate
and the warm-up of DataComp's scale configs; everything else keeps the DataComp recipe
(AdamW, weight decay 0.2, beta2 0.98, eps 1e-6, cosine schedule with linear warm-up).
``tiny`` is ours: the smallest run that exercises every code path (tests and ``--smoke``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

# DataComp's scales (samples seen = pool size). ``tiny`` and ``toy`` are raymimic's own.
PRESETS: dict[str, dict] = {
    "tiny": {"model": "raymimic-tiny", "samples_seen": 64, "global_batch": 8, "lr": 1e-3, "warmup": 2},
    "toy": {"model": "raymimic-small", "samples_seen": 20_000, "global_batch": 256, "lr": 5e-4, "warmup": 20},
    "small": {"model": "ViT-B-32", "samples_seen": 12_800_000, "global_batch": 4096, "lr": 5e-4, "warmup": 500},
    "medium": {"model": "ViT-B-32", "samples_seen": 128_000_000, "global_batch": 4096, "lr": 5e-4, "warmup": 500},
    "large": {"model": "ViT-B-16", "samples_seen": 1_280_000_000, "global_batch": 8192, "lr": 5e-4, "warmup": 500},
    "xlarge": {"model": "ViT-L-14", "samples_seen": 12_800_000_000, "global_batch": 90112, "lr": 1e-3, "warmup": 10000},
}

DEFAULT_PRESET = "small"  # the preset of ``raymimic train`` when none is named
PRECISIONS = ("auto", "fp32", "amp_bf16")
SCORE_KINDS = ("proj", "cos")  # proj: <-g_i, V>/||V||; cos: also divided by ||g_i||
DEFAULT_TAU = 0.05  # softmax temperature of the weights (the paper's choice at small scale)
DEFAULT_MIMIC_LAYER = "image-mlp"  # the image tower's last MLP c_proj (an alias of raymimic.clip.layers.ALIASES)


def _to_json(config) -> str:
    """A config dataclass as indented JSON (tuples become lists)."""
    return json.dumps(dataclasses.asdict(config), indent=2, default=str)


@dataclass
class TrainConfig:
    """Everything one Stage-1 run needs; plain data so that it travels to Ray workers as a dict."""

    output: str  # run folder (local path or fsspec URI): scores/, checkpoints/, ray_train/
    model: str = "ViT-B-32"
    pretrained: str | None = None  # initial weights (tag, path or URI); None = random init as DataComp
    reference: str | None = None  # MODEL:TAG, tag, path or URI; None = plain training, no scores
    pool: str | None = None  # DataComp pool (folder or fsspec URI) that run_training reads; fit() takes a dataset instead
    mimic_layer: str = DEFAULT_MIMIC_LAYER
    weighting: str = "grad-mimic"
    tau: float = DEFAULT_TAU
    score_kind: str = "proj"
    reweight_all: bool = False  # re-weight every layer's gradient, not only the mimic layer's
    samples_seen: int = 12_800_000
    global_batch: int = 4096
    lr: float = 5e-4
    warmup: int = 500
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    precision: str = "auto"
    grad_checkpointing: bool = False
    workers: int = 2
    min_workers: int | None = None  # with max_workers: elastic training
    max_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 0  # steps; 0 = five checkpoints per run, as DataComp
    score_flush_every: int = 200  # steps between score files (bounded memory); always at checkpoints
    log_every: int = 10
    shuffle_buffer: int = 0  # local shuffle buffer (rows); 0 = pool order
    seed: int = 0
    max_failures: int = 3
    run_name: str = "ray_train"
    progress: bool = True
    # fault injection for tests: this rank calls os._exit at this step, first attempt only
    crash_at_step: int | None = None
    crash_rank: int = 1
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return _to_json(self)

    def __post_init__(self):
        if self.global_batch < 1 or self.samples_seen < self.global_batch:
            raise ValueError(f"need samples_seen ({self.samples_seen}) >= global_batch ({self.global_batch}) >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind {self.score_kind!r} is not one of {SCORE_KINDS}")
        if not self.tau > 0:
            raise ValueError(f"tau (the softmax temperature) must be > 0, got {self.tau}")
        if not isinstance(self.reweight_all, bool):
            raise ValueError(f"reweight_all must be True or False, got {self.reweight_all!r}")
        if self.lr < 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ValueError(f"lr, warmup and weight_decay must be >= 0, got {self.lr}, {self.warmup}, {self.weight_decay}")
        if self.workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError(f"need workers >= 1 and cpus_per_worker > 0, got {self.workers} and {self.cpus_per_worker}")
        if self.checkpoint_every < 0 or self.shuffle_buffer < 0 or self.max_failures < 0:
            raise ValueError("checkpoint_every, shuffle_buffer and max_failures must be >= 0, got "
                             f"{self.checkpoint_every}, {self.shuffle_buffer}, {self.max_failures}")
        if self.min_workers is not None and self.max_workers is not None and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self.min_workers} and {self.max_workers}")
        if self.reference is None and self.weighting in ("grad-mimic", "rho"):
            raise ValueError(f"weighting {self.weighting!r} needs a reference model (--reference)")

    @property
    def total_steps(self) -> int:
        return self.samples_seen // self.global_batch

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or max(1, self.total_steps // 5)

    def local_batch(self, world_size: int) -> int:
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {world_size} workers")
        return self.global_batch // world_size

    @property
    def scores_dir(self) -> str:
        return f"{self.output.rstrip('/')}/scores"

    @property
    def checkpoints_dir(self) -> str:
        return f"{self.output.rstrip('/')}/checkpoints"


def run_training(cfg: TrainConfig):
    """Stage 1 on the pool ``cfg.pool``: :func:`raymimic.train.trainer.fit` on its CLIP training dataset.

    Needs a running (or startable) Ray; returns the :class:`~raymimic.train.trainer.RunSummary`.
    """
    from raymimic.data.preprocess import clip_training_dataset
    from raymimic.train.trainer import fit

    if not cfg.pool:
        raise ValueError("TrainConfig.pool is not set: give the DataComp pool to train on (or call fit() with a dataset)")
    return fit(cfg, clip_training_dataset(cfg.pool, cfg.model))


@dataclass
class ScoreConfig:
    """The score-only pass (:func:`raymimic.train.score_only.run_score_only`): every sample of a pool at one checkpoint."""

    pool: str  # DataComp pool folder or fsspec URI
    model: str  # open_clip model name of the checkpoint
    reference: str  # MODEL:TAG, tag, path or URI, same architecture as model
    output: str  # folder or URI; the score table goes to OUTPUT/scores/
    checkpoint: str | None = None  # the model to score with (path, URI or pretrained tag); None = random init
    mimic_layer: str = DEFAULT_MIMIC_LAYER
    score_kind: str = "proj"
    tau: float = DEFAULT_TAU  # temperature of the weight column (softmax over each scoring batch)
    batch_size: int = 256  # scoring batch: the contrastive loss runs over it
    actors: int = 1
    use_gpu: bool = False
    step: int | None = None  # value of the step column; None = the checkpoint's step, else -1

    def __post_init__(self):
        for name in ("pool", "model", "reference", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind {self.score_kind!r} is not one of {SCORE_KINDS}")
        if not self.tau > 0:
            raise ValueError(f"tau (the softmax temperature) must be > 0, got {self.tau}")
        if self.batch_size < 1 or self.actors < 1:
            raise ValueError(f"batch_size and actors must be >= 1, got {self.batch_size} and {self.actors}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return _to_json(self)
