"""One config for the whole label-noise simulation, and the library call that runs it.

:class:`SimConfig` holds the data, the noise levels, the methods, the per-run training
settings and where the results go; :func:`run_simulation` runs
:func:`raymimic_experiments.label_noise.simulate.simulate` with it. Importing this module does not import torch:
the registries it validates against are imported when a config is built.

Why the defaults are what they are (the model, 10 epochs at lr 3e-3, tau 0.3 where the paper
used 5 epochs at lr 1e-4 and tau 1) and what they give is measured in docs/simulation.md.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from raymimic.score_table.columns import CONTROLS

CONTROL_REFERENCES = (*CONTROLS, "noisy")
"""References Grad-Mimic also runs with in place of the clean one: the controls, and ``noisy`` (the SGD model of the noisy labels)."""
# torchvision class name and whether its constructor takes ``train=`` (the others ``split=``)
TORCHVISION_DATASETS = {
    "cifar10": ("CIFAR10", "train"),
    "cifar100": ("CIFAR100", "train"),
    "mnist": ("MNIST", "train"),
    "fashion-mnist": ("FashionMNIST", "train"),
    "kmnist": ("KMNIST", "train"),
    "svhn": ("SVHN", "split"),
}
DATASETS = ("digits",) + tuple(TORCHVISION_DATASETS)
"""Datasets by name: scikit-learn's digits (ships with it) and torchvision datasets already on disk."""
MODELS = ("probe", "linear", "mlp")
"""Classifiers by name (:func:`raymimic_experiments.label_noise.train.build_model`)."""


def _all_methods() -> tuple[str, ...]:
    from raymimic.mimic.weighting import WEIGHTINGS

    return tuple(WEIGHTINGS)


def _all_controls() -> tuple[str, ...]:
    return CONTROL_REFERENCES


@dataclass
class SimConfig:
    """Everything one simulation needs: data, noise, methods, the per-run training, outputs."""

    # data
    dataset: str = "digits"  # digits (ships with scikit-learn) or a torchvision dataset on disk (DATASETS)
    data_dir: str | None = None  # folder torchvision stored the dataset in; needed for every dataset but digits
    max_train: int | None = None  # random subset of this many training samples; None = all
    max_test: int | None = None  # random subset of this many test samples; None = all
    noise_levels: tuple[float, ...] = (0.4, 0.5, 0.6)  # symmetric label-noise rates, each in [0, 1)
    seed: int = 0  # split, noise, model initialisation and batch order
    # methods compared: names of raymimic.mimic.weighting.WEIGHTINGS; default every one of them
    methods: tuple[str, ...] = field(default_factory=_all_methods)
    # Grad-Mimic is also run with these control references in place of the clean one (CONTROL_REFERENCES:
    # zero, init, random, noisy); only when grad-mimic is among the methods; () = none
    controls: tuple[str, ...] = field(default_factory=_all_controls)
    # training of every run and of the reference (raymimic_experiments.label_noise.train.ClassifierTrainConfig)
    model: str = "probe"  # probe (frozen random features + trainable head), linear or mlp (MODELS)
    hidden: int = 256  # width of the encoder's feature map for probe/mlp
    epochs: int = 10
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-5
    batch_size: int = 32
    tau: float = 0.3  # softmax temperature of Grad-Mimic, GraNd and RHO
    score_kind: str = "proj"  # proj or cos (raymimic.train.config.SCORE_KINDS)
    reweight_all: bool = False  # re-weight every layer's gradient, not only the head's
    # detection and outputs
    eval_every: int = 5  # test accuracy every this many steps: the steps each run needs to reach SGD's final accuracy
    vote_rule: str | float = "majority"  # ensemble rule over epochs and binarizers: majority, all, any or a fraction in (0, 1]
    threads: int = 1  # torch CPU threads while it runs (the models are tiny)
    output: str = "simulation-results"  # folder for results.json and results.md
    save_scores: bool = False  # also write each run's score rows to OUTPUT/scores/<noise>_<method>.parquet

    def __post_init__(self):
        from raymimic.mimic.weighting import WEIGHTINGS
        from raymimic.select.ensemble import check_rule
        from raymimic.train.config import SCORE_KINDS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset {self.dataset!r} is not known; choose one of {list(DATASETS)}")
        if self.dataset != "digits" and not self.data_dir:
            raise ValueError(f"dataset {self.dataset!r} is read from disk: give data_dir (--data-dir), the folder torchvision stored it in")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None for all samples), got {getattr(self, name)}")
        if isinstance(self.noise_levels, (int, float)):
            self.noise_levels = (self.noise_levels,)
        self.noise_levels = tuple(float(rate) for rate in self.noise_levels)
        if not self.noise_levels:
            raise ValueError("noise_levels is empty: give at least one noise rate in [0, 1)")
        for rate in self.noise_levels:
            if not 0 <= rate < 1:
                raise ValueError(f"noise_levels: {rate} is not a noise rate; each is a fraction in [0, 1)")
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(self.methods)
        if not self.methods:
            raise ValueError(f"methods is empty: give at least one of {list(WEIGHTINGS)}")
        unknown = [m for m in self.methods if m not in WEIGHTINGS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(WEIGHTINGS)}")
        if isinstance(self.controls, str):
            self.controls = (self.controls,)
        self.controls = tuple(self.controls)
        if self.controls == ("none",):
            self.controls = ()
        unknown = [c for c in self.controls if c not in CONTROL_REFERENCES]
        if unknown:
            raise ValueError(f"controls: unknown {unknown}; choose from {list(CONTROL_REFERENCES)} (or none)")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls: {list(self.controls)} names a control twice")
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is not one of {list(MODELS)}")
        for name in ("hidden", "epochs", "batch_size", "threads", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.score_kind not in SCORE_KINDS:
            raise ValueError(f"score_kind {self.score_kind!r} is not one of {list(SCORE_KINDS)}")
        if not isinstance(self.reweight_all, bool):
            raise ValueError(f"reweight_all must be True or False, got {self.reweight_all!r}")
        self.vote_rule = check_rule(self.vote_rule)
        if not self.output:
            raise ValueError("output is required: the folder for results.json and results.md")

    def train_config(self):
        """The per-run training settings as :class:`raymimic_experiments.label_noise.train.ClassifierTrainConfig`."""
        from raymimic_experiments.label_noise.train import ClassifierTrainConfig

        return ClassifierTrainConfig(model=self.model, hidden=self.hidden, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                           batch_size=self.batch_size, tau=self.tau, score_kind=self.score_kind, reweight_all=self.reweight_all,
                           seed=self.seed, eval_every=self.eval_every)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def run_simulation(cfg: SimConfig, log: Callable[[str], None] | None = None) -> tuple[dict, str, str]:
    """Run the simulation of ``cfg`` with ``cfg.threads`` torch threads; return (results, json path, md path).

    The caller's torch thread count is restored afterwards.
    """
    import torch

    from raymimic_experiments.label_noise.simulate import simulate

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return simulate(
            dataset=cfg.dataset, data_dir=cfg.data_dir, noise_levels=list(cfg.noise_levels), methods=list(cfg.methods),
            config=cfg.train_config(), output_dir=cfg.output, max_train=cfg.max_train, max_test=cfg.max_test,
            vote_rule=cfg.vote_rule, save_scores=cfg.save_scores, log=log, controls=list(cfg.controls),
        )
    finally:
        torch.set_num_threads(previous_threads)  # callers in the same process keep their setting
