"""Chain Stage 2 filters with your own Ray Data step and write a DataComp subset.

    python examples/chain_filters.py --scores RUN/scores --pool POOL --output OUT

The pipeline: DataComp basic rules -> CLIP score top 30% of the pool -> drop the bottom 20%
by mimic score (the paper's best DataComp filter) -> your own step (here: drop captions
that are mostly digits) -> OUT/keep.npy for DataComp's ``resharder.py -s``.
"""
from __future__ import annotations

import argparse
import os

import pandas as pd


def mostly_text(batch: pd.DataFrame) -> pd.DataFrame:
    """A user's own Ray Data step: any function of a batch works between the stages."""
    digits = batch["text"].fillna("").str.count(r"\d")
    return batch[digits < 0.5 * batch["text"].fillna("").str.len().clip(lower=1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="Stage 1 score tables (RUN/scores)")
    parser.add_argument("--pool", required=True, help="DataComp pool root with metadata/*.parquet")
    parser.add_argument("--output", required=True, help="where keep.npy, decisions.parquet and summary.json go")
    parser.add_argument("--language-model", help="fastText language-id model (optional: the English check is skipped without it)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from raymimic.data.metadata import read_metadata
    from raymimic.select import filters, mimic, output, stages

    ray.init(include_dashboard=False, configure_logging=False)
    pool = read_metadata(args.pool, columns=["text", "original_width", "original_height", "clip_l14_similarity_score"])

    # Ranking stages are fitted on the dataset they receive, so put the CLIP ranking first
    # (top 30% of the whole pool); the mimic ranking is global by construction (it ranks
    # every uid of the score table), so "bottom 20%" is of the pool whatever comes before.
    chain = [
        filters.CLIPScoreFilter(top_fraction=0.3, column="clip_l14_similarity_score"),
        mimic.MimicFilter(args.scores, method="top-fraction", fraction=0.8),
        filters.BasicFilter(language_model=args.language_model),
    ]
    kept = stages.run_stages(pool, chain)
    kept = kept.map_batches(mostly_text, batch_format="pandas")
    kept = kept.map_batches(lambda b: b.assign(keep=True), batch_format="pandas")

    summary = output.write_outputs(kept, args.output, keep_column="keep", quality_column="mimic_score",
                                   columns=["uid", "clip_score", "mimic_score", "keep"],
                                   summary={"stages": [stage.params() for stage in chain]})
    print(f"kept {summary['n_kept']} samples; wrote {summary['files']['keep.npy']}")


if __name__ == "__main__":
    main()
