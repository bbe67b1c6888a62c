"""Experiments above the raymimic library, the way ``open_clip_train`` sits above ``open_clip``.

They import the library; nothing in the library imports them (the application, ``raymimic.app``,
runs them as commands):

- :mod:`raymimic_experiments.toy_pool`: a DataComp-layout toy pool with known noisy captions;
- :mod:`raymimic_experiments.quickstart`: the whole flow on a toy pool (``raymimic quickstart``);
- :mod:`raymimic_experiments.reference_lift`: the reference-lift grid, in one process
  (``benchmarks/reference_lift.py``);
- :mod:`raymimic_experiments.label_noise`: the paper's label-noise simulation (``raymimic simulate``).
"""
