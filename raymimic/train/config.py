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

# the control directions recorded beside the score and the per-sample baselines (raymimic.mimic.controls has the maths)
from raymimic.score_table.columns import BASELINES, BUILTIN_CONTROLS, REFERENCE_VARIANTS
from raymimic.score_table.columns import CONTROL_NAME as _NAME

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
# the primary score's V: W_ref - W_t every step (the paper), W_ref - W_0, or V_fn = -dD/dW (raymimic.mimic.function)
DIRECTIONS = ("current", "fixed", "function")
DEFAULT_CONTROLS = ("zero", "fixed")  # what every scoring run records unless told otherwise
# steps between re-alignments of the "aligned" control (raymimic.clip.align): a fit matches every
# hidden unit of the mimic layer (a Hungarian assignment, seconds at ViT-B-32's 3,072 units), so it
# is amortised over many steps; short runs should pass a smaller value
DEFAULT_ALIGN_EVERY = 1000
_NEED_REFERENCE = ("random", *REFERENCE_VARIANTS)  # controls built from W_ref
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # torch.distributed process-group timeout of a run


def _names(value, what: str) -> list[str]:
    """A list of names from a list/tuple or a comma-separated string (``""`` and ``"none"``: no names)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [] if value.strip().lower() in ("", "none") else [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of names or a comma-separated string, got {value!r}")
    return list(value)


def parse_control(entry: str) -> tuple[str, str | None]:
    """``"zero"`` -> ``("zero", None)``; ``"NAME=SPEC"`` (another reference) -> ``(NAME, SPEC)``."""
    name, sep, spec = entry.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep:
        if name not in BUILTIN_CONTROLS:
            raise ValueError(f"unknown control {entry!r}: use one of {', '.join(BUILTIN_CONTROLS)}, or NAME=SPEC for another "
                             "reference (SPEC as --reference takes: MODEL:TAG, tag, path or URI)")
        return name, None
    if not _NAME.fullmatch(name):
        raise ValueError(f"control {entry!r}: the name {name!r} must match [a-z0-9_]+ (its column is score_<name>)")
    if name in BUILTIN_CONTROLS or name in BASELINES or name == "none":
        raise ValueError(f"control {entry!r}: the name {name!r} is taken (built-in controls {', '.join(BUILTIN_CONTROLS)}; "
                         f"baselines {', '.join(BASELINES)}); pick another NAME")
    if not spec:
        raise ValueError(f"control {entry!r}: give the other reference after '=' (MODEL:TAG, tag, path or URI)")
    return name, spec


def resolve_controls(controls, *, reference: bool, direction: str = "current", score_only: bool = False) -> list[str]:
    """The validated control list of a run (entries as given, ``NAME=SPEC`` kept whole).

    * the default set (:data:`DEFAULT_CONTROLS`) adapts: without a reference it is empty (no score,
      nothing to control), and a control identical to the primary score is dropped from it
      (``fixed`` under ``direction="fixed"`` and in the score-only pass);
    * an explicit set is refused where an entry needs the reference and there is none (``random``,
      ``fixed``, ``current``), where it equals the primary score (``current`` under
      ``direction="current"``, ``fixed`` under ``direction="fixed"``; ``fixed``/``current`` in the
      score-only pass) or is degenerate (``init`` in the score-only pass: ``W_0`` is the scored
      checkpoint, so ``W_0 - W_t = 0``), and for unknown controls, bad names and duplicates.
    """
    entries = _names(controls, "controls")
    parsed = [parse_control(e) for e in entries]
    names = [n for n, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"controls {entries} name {duplicates} more than once (each becomes one column score_<name>)")
    same_as_primary = {"current", "fixed"} if score_only else {direction}
    if tuple(entries) == DEFAULT_CONTROLS:
        if not reference:
            return []
        return [e for e in entries if e not in same_as_primary]
    for name, spec in parsed:
        if spec is not None:
            continue
        if not reference and name in _NEED_REFERENCE:
            raise ValueError(f"control {name!r} needs a reference model (--reference); without one only zero, init and "
                             "NAME=SPEC can be recorded")
        if name in same_as_primary:
            what = "the score-only pass scores against W_ref - W_ckpt" if score_only else f"--direction is {direction}"
            raise ValueError(f"control {name!r} would repeat the primary score ({what}); leave it out")
        if score_only and name == "init":
            raise ValueError("control 'init' is degenerate in the score-only pass: W_0 is the scored checkpoint, so "
                             "W_0 - W_ckpt = 0; use zero or random")
    return entries


def resolve_baselines(baselines, *, reference: bool) -> list[str]:
    """The validated baseline list: names from :data:`BASELINES`, once each; all but ``loss`` need a reference."""
    names = _names(baselines, "baselines")
    for name in names:
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}: use one of {', '.join(BASELINES)}")
        if not reference and name != "loss":
            raise ValueError(f"baseline {name!r} needs a reference model (--reference): it runs the reference forward")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"baselines {names} name {duplicates} more than once")
    return names


def _resources(value) -> dict[str, float]:
    """Validated custom Ray resources per worker (name -> amount >= 0; CPU and GPU have their own fields)."""
    if not isinstance(value, dict):
        raise ValueError(f"resources_per_worker must be a dict of Ray resource name -> amount per worker, got {value!r}")
    for name, amount in value.items():
        if name in ("CPU", "GPU"):
            raise ValueError(f"resources_per_worker may not set {name!r}: use {'cpus_per_worker' if name == 'CPU' else 'use_gpu'}")
        if not isinstance(name, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ValueError(f"resources_per_worker needs resource name -> amount >= 0, got {name!r}: {amount!r}")
    return {name: float(amount) for name, amount in value.items()}


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
    # uniform weights while recording: Grad-Mimic re-weighting was measured to make the recorded scores worse
    # selectors (docs/findings.md); "grad-mimic" re-weights as the paper does
    weighting: str = "sgd"
    tau: float = DEFAULT_TAU
    score_kind: str = "proj"
    reweight_all: bool = False  # re-weight every layer's gradient, not only the mimic layer's
    # the primary score's V: current = W_ref - W_t (the paper), fixed = W_ref - W_0, function = -dD/dW (raymimic.mimic.function)
    direction: str = "current"
    # control directions, one column score_<name> each (zero, init, random, fixed, current, NAME=SPEC); see resolve_controls
    controls: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROLS))
    baselines: list[str] = field(default_factory=list)  # loss, ref_loss, rho, ref_clipscore: columns score_<name>
    align_every: int = DEFAULT_ALIGN_EVERY
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
    # the target's initialisation seed, seeded as open_clip_train seeds before building the model: the --seed a reference
    # trained with open_clip_train recorded puts the target at that reference's own initialisation (None: seed)
    init_seed: int | None = None
    max_failures: int = 3
    run_name: str = "ray_train"
    progress: bool = True
    # seconds a rank may wait in a torch.distributed collective before it fails the run (instead of waiting forever)
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    # custom Ray resources per worker besides CPU and GPU, e.g. {"trainer_slot": 1} to land workers on one node type
    resources_per_worker: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> TrainConfig:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
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
        if self.align_every < 1:
            raise ValueError(f"align_every must be >= 1 step, got {self.align_every}")
        if self.checkpoint_every < 0 or self.shuffle_buffer < 0 or self.max_failures < 0:
            raise ValueError("checkpoint_every, shuffle_buffer and max_failures must be >= 0, got "
                             f"{self.checkpoint_every}, {self.shuffle_buffer}, {self.max_failures}")
        timeout = self.collective_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"collective_timeout_s must be a number of seconds > 0, got {timeout!r}")
        self.resources_per_worker = _resources(self.resources_per_worker)
        if self.min_workers is not None and self.max_workers is not None and not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers, got {self.min_workers} and {self.max_workers}")
        if self.reference is None and self.weighting in ("grad-mimic", "rho"):
            raise ValueError(f"weighting {self.weighting!r} needs a reference model (--reference)")
        if self.init_seed is not None and self.pretrained:
            raise ValueError(f"init_seed ({self.init_seed}) seeds a random initialisation; it cannot be combined with pretrained "
                             f"({self.pretrained!r})")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction {self.direction!r} is not one of {DIRECTIONS}")
        if self.direction != "current" and self.reference is None:
            raise ValueError(f"direction {self.direction!r} needs a reference model (--reference)")
        self.controls = resolve_controls(self.controls, reference=self.reference is not None, direction=self.direction)
        self.baselines = resolve_baselines(self.baselines, reference=self.reference is not None)

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
    # control directions (zero, random, NAME=SPEC; init, fixed and current are refused here, see resolve_controls)
    controls: list[str] = field(default_factory=lambda: list(DEFAULT_CONTROLS))
    baselines: list[str] = field(default_factory=list)  # loss, ref_loss, rho, ref_clipscore
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
        self.controls = resolve_controls(self.controls, reference=True, score_only=True)
        self.baselines = resolve_baselines(self.baselines, reference=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return _to_json(self)
