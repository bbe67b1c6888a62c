"""The reference-lift study: does the mimic score select data *because of the reference*?

In one process, without Ray (so a grid of runs fits on a laptop), on a toy pool with known
random and systematic noise:

- :mod:`raymimic_experiments.reference_lift.data` loads a DataComp-layout pool into tensors with the model's own
  transform and tokenizer;
- :mod:`raymimic_experiments.reference_lift.train` trains open_clip models with the library's Stage-1 step
  (:func:`raymimic.train.step.build_mimic_step`), recording per-sample scores against the
  reference, its controls and baselines, and keeps checkpoints;
- :mod:`raymimic_experiments.reference_lift.score` scores saved checkpoints on any mimic layer and direction,
  optionally against an aligned reference (:mod:`raymimic.clip.align`), in score-table rows;
- :mod:`raymimic_experiments.reference_lift.metrics` turns score rows into per-uid detection metrics with the
  Stage-2 filter (:class:`raymimic.select.mimic_filter.MimicFilter`, local path) and the gate checks
  of a pool that needs a reference.

``benchmarks/reference_lift.py`` runs the grid and writes the tables of ``docs/findings.md``.
"""
