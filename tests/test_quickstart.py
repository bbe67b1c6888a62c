"""The quickstart's own logic (the flow's stages are tested in their own modules)."""
import numpy as np
import pytest

from raymimic_experiments.quickstart import detection_metrics, write_report


def test_detection_metrics_on_a_hand_example():
    dropped = np.array([True, True, False, False, True])
    noisy = np.array([True, False, False, True, True])
    m = detection_metrics(dropped, noisy)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["dropped"] == 3 and m["noisy"] == 3


def test_report_lists_every_model_and_writes_plots(tmp_path):
    model = {"zeroshot_top1": 0.5, "zeroshot_top5": 0.9, "image_to_text_recall@1": 0.1, "image_to_text_recall@5": 0.3,
             "text_to_image_recall@1": 0.1, "text_to_image_recall@5": 0.2}
    results = {
        "config": {"samples": 100, "noise": 0.4, "model": "raymimic-tiny", "method": "ensemble"},
        "filter": {"kept": 60, "quality": {"fraction_kept": 0.6}},
        "detection": detection_metrics(np.array([True, False]), np.array([True, False])),
        "detection_clipscore": detection_metrics(np.array([False, True]), np.array([True, False])),
        "models": {"whole pool": {**model, "samples": 100}, "mimic filter": {**model, "samples": 60, "zeroshot_top1": 0.7}},
        "seconds": 12.0,
    }
    path = write_report(str(tmp_path), results)
    text = open(path).read()
    assert "| whole pool | 100 | 0.500" in text and "| mimic filter | 60 | 0.700" in text
    assert "| mimic (ensemble) | 60 | 1.000 | 1.000 | 1.000 |" in text
    assert (tmp_path / "models.png").stat().st_size > 1000 and (tmp_path / "results.json").exists()


def test_report_sets_the_two_modes_side_by_side_with_the_gates(tmp_path):
    model = {"zeroshot_top1": 0.5, "zeroshot_top5": 0.9, "image_to_text_recall@1": 0.1, "image_to_text_recall@5": 0.3,
             "text_to_image_recall@1": 0.1, "text_to_image_recall@5": 0.2}
    detection = detection_metrics(np.array([True, False]), np.array([True, False]))
    modes = {
        "best": {"stage1_weighting": "sgd", "filter": {"method": "ensemble", "score_column": "score"}, "kept": 60,
                    "detection": detection, "kept_by_kind": {"clean": 55, "relabelled": 3, "boilerplate": 2},
                    "lift": {"columns": {"score": {"kind": "reference", "auc": 0.7}, "score_zero": {"kind": "control", "auc": 0.3,
                                                                                                           "auc_either_sign": 0.7},
                                         "score_init": {"kind": "control", "auc": 0.6, "auc_either_sign": 0.6}}}},
        "paper-top30": {"stage1_weighting": "grad-mimic", "filter": {"paper_datacomp": "top30"}, "kept": 70,
                        "detection": detection, "kept_by_kind": {"clean": 50, "relabelled": 9, "short_caption": 11},
                        "lift": {"columns": {"score": {"kind": "reference", "auc": 0.68},
                                             "score_zero": {"kind": "control", "auc": 0.7, "auc_either_sign": 0.7}}}},
        "paper-clip30-minus15": {"stage1_weighting": "grad-mimic", "filter": {"paper_datacomp": "clip30-minus15"}, "kept": 25,
                                 "detection": detection, "kept_by_kind": {"clean": 24, "relabelled": 1}, "lift": None},
        "simulation": {"stage1_weighting": "grad-mimic", "filter": {"method": "ensemble", "paper_rule": True}, "kept": 31,
                       "detection": detection, "kept_by_kind": {"clean": 31}, "lift": None},
    }
    gates = {"reference_loss_auc": 0.93, "target_loss_auc": 0.55, "reference_flags_relabelled": True, "target_does_not": True,
             "passed": True, "thresholds": {"reference_min": 0.8, "target_max": 0.65}}
    results = {
        "config": {"samples": 100, "noise": 0.3, "relabel": 0.1, "model": "raymimic-tiny", "method": "ensemble"},
        "filter": {"kept": 60, "quality": {}}, "detection": detection, "detection_clipscore": detection,
        "clipscore_kept_by_kind": {"clean": 58, "relabelled": 2}, "modes": modes, "gates": gates, "lift": None,
        "models": {"whole pool": {**model, "samples": 100},
                   "simulation mode": {"samples": 31, "skipped": "kept 31 samples, fewer than one batch of 128"}}, "seconds": 3.0,
    }
    (tmp_path / "filter_best").mkdir()
    (tmp_path / "filter_best" / "gallery.html").write_text("<!DOCTYPE html>")
    text = open(write_report(str(tmp_path), results)).read()
    assert "in pictures: [best](filter_best/gallery.html)\n" in text  # the paper's modes wrote no gallery here
    assert "gate 1 [PASS]" in text and "AUC 0.930" in text and "the pool needs a reference" in text
    assert "| best | sgd | ensemble on `score` | 60 |" in text and "| 3 | 2 | +0.000 |" in text  # 0.7 - max(0.7, 0.6)
    assert "| paper-top30 | grad-mimic | paper DataComp: top 30% by `score` | 70 |" in text and "| 9 | 11 | -0.020 |" in text
    assert ("| paper-clip30-minus15 | grad-mimic | paper DataComp: CLIPScore (L/14) top 30% minus `score` bottom 15% | 25 |"
            in text) and "| 1 | 0 | n/a |" in text
    assert "| simulation | grad-mimic | label-noise simulation rule (binarize w) | 31 |" in text
    assert "| CLIPScore, same size as best |" in text
    assert "| simulation mode | 31 | not trained: kept 31 samples, fewer than one batch of 128 |" in text
    assert (tmp_path / "models.png").exists()


def test_quickstart_modes_and_bad_settings():
    from raymimic_experiments.quickstart import QuickstartConfig

    cfg = QuickstartConfig(stage1_weighting="sgd", filter_score_column="aligned")
    modes = cfg.mode_settings()
    assert modes["best"] == {"weighting": "sgd", "filter": {"method": "ensemble", "feature": "step_z", "score_column": "aligned"}}
    assert list(modes) == ["best", "paper-top30", "paper-clip30-minus15"]
    assert modes["paper-top30"] == {"weighting": "grad-mimic", "filter": {"paper_datacomp": "top30"}}
    assert modes["paper-clip30-minus15"] == {"weighting": "grad-mimic", "filter": {"paper_datacomp": "clip30-minus15"}}
    assert list(QuickstartConfig(paper_mode=False).mode_settings()) == ["best"]
    with pytest.raises(ValueError, match="paper_rules \\['top50'\\] unknown"):
        QuickstartConfig(paper_rules=["top30", "top50"])
    assert QuickstartConfig(seed=3).reference_seed == 4 and QuickstartConfig(seed=3, reference_init="same").reference_seed == 3
    with pytest.raises(ValueError, match="noise \\+ relabel"):
        QuickstartConfig(noise=0.6, relabel=0.5)
    with pytest.raises(ValueError, match="reference_init"):
        QuickstartConfig(reference_init="mine")
