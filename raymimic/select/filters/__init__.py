"""Filters beside the mimic score (docs/filters.md), as chainable Ray Data stages, one module each.

- :class:`CLIPScoreFilter` (:mod:`.clipscore`): cosine of a teacher CLIP's image and text embeddings, read from
  DataComp's metadata columns or computed with an open_clip model in ``map_batches``;
- :class:`NegCLIPLossFilter` (:mod:`.negclip`): negCLIPLoss(i) = CLIPScore(i) - R(i), from embeddings, against a
  seeded bank of negatives drawn from the whole pool (the same for every block), streamed in chunks;
- :class:`NormSimFilter` (:mod:`.normsim`): NormSim_p(i) = ||(<f_t, f_i>)_t||_p against target embeddings, streamed
  in chunks (p = 2 through the targets' dim x dim Gram matrix); see docs/filters.md;
- :class:`BasicFilter` (:mod:`.basic`): DataComp's basic rules (English, caption length, image size/shape).

The maths of each score is a plain numpy/torch function (tested directly); the stage classes only wire it into
Ray Data. :mod:`.common` holds what they share (chunk sizes by device, device copies of
a large state held for one stage and released with it).
"""
from raymimic.select.filters.basic import (
    BUNDLED_LANGUAGE_MODEL,
    BasicFilter,
    basic_rules,
    bundled_language_model_name,
    bundled_language_model_path,
    fasttext_language_model,
)
from raymimic.select.filters.clipscore import CLIPScoreFilter, clip_scores
from raymimic.select.filters.common import CHUNKS, chunk_sizes, similarities
from raymimic.select.filters.negclip import (
    NegCLIPLossFilter,
    bank_candidates,
    bank_keys,
    bank_threshold,
    draw_negative_bank,
    merge_bank_candidates,
    neg_clip_loss,
    neg_clip_loss_banked,
    negclip_score_frame,
    row_hashes,
)
from raymimic.select.filters.normsim import NormSimFilter, norm_sim, norm_sim_prepared, normsim_score_frame, prepare_targets

__all__ = [
    "BUNDLED_LANGUAGE_MODEL", "CHUNKS", "BasicFilter", "CLIPScoreFilter", "NegCLIPLossFilter", "NormSimFilter", "bank_candidates",
    "bank_keys", "bank_threshold", "basic_rules", "bundled_language_model_name", "bundled_language_model_path", "chunk_sizes",
    "clip_scores", "draw_negative_bank", "fasttext_language_model", "merge_bank_candidates", "neg_clip_loss", "neg_clip_loss_banked",
    "negclip_score_frame", "norm_sim", "norm_sim_prepared", "normsim_score_frame", "prepare_targets",
    "row_hashes", "similarities",
]
