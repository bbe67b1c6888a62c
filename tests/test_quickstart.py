"""The quickstart's own logic (the flow's stages are tested in their own modules)."""
import numpy as np
import pytest

from raymimic.quickstart import detection_metrics, write_report


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
