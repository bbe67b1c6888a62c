"""The named choices of the library's registries, as plain data (no imports).

The command line builds its options and help from these names without importing torch; the
modules that implement each choice key their registries by the same names
(:data:`raymimic.mimic.weighting.WEIGHTINGS`, :func:`raymimic.clip.layers.resolve_mimic_layer`).
The score columns' names live in :mod:`raymimic.score_table.columns`.
"""
from __future__ import annotations

WEIGHTINGS = ("sgd", "grad-mimic", "grad-norm", "agra", "rho", "grad-match")
"""Batch weightings by name, the keys of :data:`raymimic.mimic.weighting.WEIGHTINGS` in its order."""

MIMIC_LAYER_ALIASES = {
    "image-mlp": "the image tower's last MLP output projection (the paper's best choice)",
    "text-mlp": "the text tower's last MLP output projection",
    "image-proj": "the image tower's final projection to the joint space (visual.proj)",
    "text-proj": "the text tower's final projection (text_projection)",
}
"""Aliases of the mimic layer in an open_clip model (:func:`raymimic.clip.layers.resolve_mimic_layer`), with what each names."""
