"""The paper's label-noise simulation: plain torch, no Ray (:mod:`~raymimic_experiments.label_noise.config` runs it)."""
