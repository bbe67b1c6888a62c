"""The label-noise simulation: noise injection, weighted training, detection and the report."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raymimic.select.quality import detection_metrics, roc_auc
from raymimic_experiments.label_noise.analysis import noise_summary, score_auroc, steps_to_reach
from raymimic_experiments.label_noise.config import CONTROL_REFERENCES
from raymimic_experiments.label_noise.control_references import control_reference
from raymimic_experiments.label_noise.data import load_dataset, symmetric_noise
from raymimic_experiments.label_noise.train import ClassifierTrainConfig, train_reference, train_run

JOB = Path(__file__).resolve().parents[1] / "jobs" / "simulation.py"


def load_job():
    """jobs/ is a folder of scripts, not a package: load the script by its path."""
    spec = importlib.util.spec_from_file_location("simulation_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models on a shared machine: one thread avoids oversubscription stalls
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, max_train=400)


@pytest.fixture(scope="module")
def reference(digits):
    return train_reference(digits, ClassifierTrainConfig(epochs=6, lr=3e-3))


def test_noise_flips_exact_fraction_to_wrong_classes():
    labels = torch.arange(1000) % 10
    noisy, is_noisy = symmetric_noise(labels, 0.37, 10, seed=3)
    assert int(is_noisy.sum()) == 370
    assert bool((noisy[is_noisy] != labels[is_noisy]).all())  # never the true class
    assert bool((noisy[~is_noisy] == labels[~is_noisy]).all())  # the others untouched
    # the wrong class is uniform over the 9 others: every offset occurs, none dominates
    offsets = ((noisy[is_noisy] - labels[is_noisy]) % 10).bincount(minlength=10)
    assert offsets[0] == 0 and int(offsets[1:].min()) > 20 and int(offsets.max()) < 70
    again, _ = symmetric_noise(labels, 0.37, 10, seed=3)
    assert torch.equal(noisy, again)


def test_noise_rejects_bad_rate():
    with pytest.raises(ValueError, match="noise rate"):
        symmetric_noise(torch.zeros(10, dtype=torch.long), 1.2, 10)


def test_torchvision_dataset_missing_on_disk_names_the_folder(tmp_path):
    with pytest.raises(ValueError, match="--data-dir"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_dataset("cifar10", data_dir=str(tmp_path))


def _write_idx(path, magic, array):
    import struct

    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_dataset_read_from_disk(tmp_path):
    # a tiny MNIST in torchvision's on-disk layout: nothing is downloaded
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", 2051, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", 2049, np.arange(n) % 10)
    data = load_dataset("mnist", data_dir=str(tmp_path))
    assert data.x_train.shape == (40, 784) and data.x_test.shape == (20, 784) and data.num_classes == 10
    assert data.y_train.tolist() == [i % 10 for i in range(40)]


def test_detection_metrics_count_dropped_as_flagged_noisy():
    keep = np.array([False, False, True, True, False])
    noisy = np.array([True, False, True, False, True])
    m = detection_metrics(keep, noisy)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["n_dropped"] == 3 and m["n_noisy"] == 3
    nothing = detection_metrics(np.ones(3, bool), np.array([True, False, False]))
    assert nothing == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "n_dropped": 0, "n_noisy": 1}
    with pytest.raises(ValueError, match="one entry per sample"):
        detection_metrics(np.ones(3, bool), np.ones(2, bool))


def test_sgd_head_gradient_replacement_matches_plain_training(digits):
    # uniform weights through reweighted_grad must reproduce the plain mean gradient exactly
    labels, _ = symmetric_noise(digits.y_train, 0.3, digits.num_classes, seed=0)
    config = ClassifierTrainConfig(epochs=1, lr=3e-3)
    replaced = train_run(digits, labels, "sgd", config, reference=None)
    plain = train_run(digits, labels, "sgd", ClassifierTrainConfig(epochs=1, lr=3e-3, reweight_all=True), reference=None)
    assert torch.allclose(replaced.model.head.weight, plain.model.head.weight, atol=1e-5)


def test_every_sample_once_per_epoch_even_with_a_remainder_of_one():
    subset = load_dataset("digits", seed=0, max_train=33)  # 33 = 32 + a lone last sample
    result = train_run(subset, subset.y_train, "grad-norm", ClassifierTrainConfig(epochs=2, batch_size=32), reference=None)
    counts = result.rows.groupby("epoch")["uid"].nunique()
    assert counts.tolist() == [33, 33] and result.rows["batch_size"].max() == 33
    assert np.isfinite(result.rows["weight"]).all()


def test_grad_mimic_down_weights_noisy_samples(digits, reference):
    labels, is_noisy = symmetric_noise(digits.y_train, 0.5, digits.num_classes, seed=1)
    result = train_run(digits, labels, "grad-mimic", ClassifierTrainConfig(epochs=2, lr=3e-3, tau=0.3), reference.model)
    rows = result.rows
    assert list(rows.columns[:7]) == ["uid", "step", "epoch", "rank", "score", "weight", "batch_size"]
    assert len(rows) == 2 * len(labels)  # one row per sample per epoch
    sample = np.array([int(u, 16) for u in rows["uid"]])
    norm_weight = rows["weight"].to_numpy() * rows["batch_size"].to_numpy()
    noisy_rows = is_noisy.numpy()[sample]
    assert norm_weight[noisy_rows].mean() < 0.6 * norm_weight[~noisy_rows].mean()
    assert rows["score"][noisy_rows].mean() < rows["score"][~noisy_rows].mean()


def test_short_simulation_writes_results_json(tmp_path):
    job = load_job()

    out = tmp_path / "sim"
    rc = job.main(["--methods", "sgd", "grad-mimic", "--noise", "0.5", "--epochs", "2", "--max-train", "300", "--output", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "digits" and (results["n_train"], results["n_test"]) == (300, 450)
    # an accuracy is a count of the 450 test images, and the clean reference learned (chance: 0.1)
    assert results["reference_test_accuracy"] * 450 == pytest.approx(round(results["reference_test_accuracy"] * 450), abs=1e-3)
    assert results["reference_test_accuracy"] > 0.5
    runs = {r["method"]: r for r in results["runs"]}
    controls = {f"grad-mimic[{c}]" for c in CONTROL_REFERENCES}
    assert set(runs) == {"sgd", "grad-mimic"} | controls  # every control by default
    assert {runs[c]["reference"] for c in controls} == set(CONTROL_REFERENCES) and runs["grad-mimic"]["reference"] == "clean"
    assert all(runs[c]["weighting"] == "grad-mimic" for c in controls)
    # the head starts at zero, so the init control is the zero control, run for run
    assert results["controls"]["init_equals_zero"]
    assert runs["grad-mimic[init]"]["test_accuracy"] == runs["grad-mimic[zero]"]["test_accuracy"]
    # the noisy control's reference is the SGD run of the same noisy labels
    assert results["controls"]["noisy_reference_test_accuracy"]["0.5"] == runs["sgd"]["test_accuracy"]
    for name in controls | {"grad-mimic"}:
        assert 0 <= runs[name]["auroc"] <= 1 and runs[name]["auroc_either_sign"] == max(runs[name]["auroc"], 1 - runs[name]["auroc"])
    assert runs["sgd"]["auroc"] is None and runs["sgd"]["steps_ratio_to_sgd"] == 1.0
    assert runs["grad-mimic"]["accuracy_curve"][-1] == [20, runs["grad-mimic"]["test_accuracy"]]  # 2 epochs x 10 batches of <= 32
    summary = results["summary"][0]
    assert summary["noise"] == 0.5 and set(summary["goal"]["compared_with"]) == {"sgd"} | controls
    mimic = runs["grad-mimic"]
    assert mimic["noise"] == 0.5 and mimic["test_accuracy"] * 450 == pytest.approx(round(mimic["test_accuracy"] * 450), abs=1e-3)
    for name in ("threshold", "kmeans", "gmm", "ensemble"):
        found = mimic["detection"][name]
        assert set(found) >= {"precision", "recall", "f1", "n_dropped"}
        # the figures describe one set of dropped samples against the 150 flipped labels (0.5 x 300)
        true_positives = found["precision"] * found["n_dropped"]
        assert true_positives == pytest.approx(round(true_positives)) and true_positives == pytest.approx(found["recall"] * 150)
        p, r = found["precision"], found["recall"]
        assert found["f1"] == pytest.approx(2 * p * r / (p + r))
    # the quality estimate is the share of the 300 training samples the ensemble keeps
    assert mimic["quality_estimate"] == pytest.approx(1 - mimic["detection"]["ensemble"]["n_dropped"] / 300)
    table = (out / "results.md").read_text()
    assert "| grad-mimic |" in table and "grad-mimic / gmm" in table
    assert "| grad-mimic[zero] |" in table and "- noise 0.5: " in table and "## Reference lift" in table


def test_cli_and_job_share_the_options():
    job = load_job()
    from raymimic.app.cli import build_parser
    from raymimic.app.simulate import config_from_args

    argv = ["--methods", "agra", "--noise", "0.2", "--tau", "0.5", "--reweight-all"]
    cli_args = build_parser().parse_args(["simulate", *argv])
    job_parser = job.build_parser()
    from_job = config_from_args(job_parser, job_parser.parse_args(argv))
    assert config_from_args(cli_args.parser, cli_args) == from_job
    assert from_job.methods == ("agra",) and from_job.noise_levels == (0.2,) and from_job.tau == 0.5 and from_job.reweight_all


def test_control_references_set_the_direction(digits, reference):
    labels, _ = symmetric_noise(digits.y_train, 0.5, digits.num_classes, seed=0)
    config = ClassifierTrainConfig(epochs=1, lr=3e-3, tau=0.3)
    seen = {}

    def observe(step, model, direction):
        if step in (0, 5):
            seen[step] = (direction.clone(), model.head.weight.detach().clone())

    zero = control_reference("zero", digits, config, reference.model)
    train_run(digits, labels, "grad-mimic", config, zero, observe=observe)
    for step in (0, 5):
        direction, weight = seen[step]
        assert torch.equal(direction, -weight)  # W_ref = 0: V = -W_t
    assert seen[5][1].abs().sum() > 0  # the head has moved by step 5, so the check is not 0 == 0
    # init is the run's own W_0, which is zero for this head; random has the clean reference's norm
    assert torch.count_nonzero(control_reference("init", digits, config, reference.model).head.weight) == 0
    clean_head = reference.model.head.weight
    random_head = control_reference("random", digits, config, reference.model).head.weight
    assert float(random_head.detach().norm()) == pytest.approx(float(clean_head.detach().norm()), rel=1e-5)
    assert not torch.allclose(random_head, clean_head)
    sgd = train_run(digits, labels, "sgd", config, reference=None)
    noisy = control_reference("noisy", digits, config, reference.model, sgd.model)
    assert torch.equal(noisy.head.weight, sgd.model.head.weight)
    with pytest.raises(ValueError, match="noisy labels"):
        control_reference("noisy", digits, config, reference.model)


def test_roc_auc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    positive = rng.random(60) < 0.4
    scores = np.round(rng.normal(size=60) + positive, 1)  # rounded: ties occur
    assert roc_auc(positive, scores) == pytest.approx(roc_auc_score(positive, scores))
    assert roc_auc([True, False, True, False], [0.9, 0.1, 0.5, 0.5]) == pytest.approx(0.875)
    assert roc_auc([True, False], [0.0, 1.0]) == 0.0  # perfectly wrong way round
    with pytest.raises(ValueError, match="positives and negatives"):
        roc_auc([True, True], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([True, False], [np.nan, 0.2])


def test_score_auroc_low_score_flags_noisy():
    import pandas as pd

    rows = pd.DataFrame({"uid": [f"{i:032x}" for i in (0, 1, 2, 3, 0, 1, 2, 3)],
                         "method_stat": [-1.0, 2.0, -0.5, 1.0, -1.0, 2.0, 0.5, 1.0]})
    found = score_auroc(rows, np.array([True, False, True, False]))
    assert found == {"auroc": 1.0, "auroc_either_sign": 1.0}
    flipped = score_auroc(rows.assign(method_stat=-rows["method_stat"]), np.array([True, False, True, False]))
    assert flipped == {"auroc": 0.0, "auroc_either_sign": 1.0}


def test_steps_to_reach_and_the_noise_summary():
    curve = [(0, 0.1), (10, 0.5), (20, 0.8), (30, 0.75), (40, 0.9)]
    assert steps_to_reach(curve, 0.8) == 20 and steps_to_reach(curve, 0.75) == 20
    assert steps_to_reach(curve, 0.9) == 40 and steps_to_reach(curve, 0.95) is None

    def run(method, acc, curve, auroc=None):
        either = None if auroc is None else max(auroc, 1 - auroc)
        return {"noise": 0.5, "method": method, "test_accuracy": acc, "accuracy_curve": curve, "auroc": auroc, "auroc_either_sign": either}

    runs = [run("sgd", 0.8, [(0, 0.1), (10, 0.7), (20, 0.85), (30, 0.8)]),
            run("grad-mimic", 0.9, [(0, 0.1), (10, 0.8), (20, 0.9)], auroc=0.95),
            run("grad-mimic[zero]", 0.7, [(0, 0.1), (10, 0.7)], auroc=0.02),
            run("grad-mimic[noisy]", 0.85, [(0, 0.1), (10, 0.6), (20, 0.82)], auroc=0.6)]
    summary = noise_summary(runs, 0.5, ["zero", "noisy"])
    by = {r["method"]: r for r in runs}
    assert summary["sgd_steps"] == 20 and by["sgd"]["steps_ratio_to_sgd"] == 1.0
    assert by["grad-mimic"]["steps_to_sgd_accuracy"] == 10 and by["grad-mimic"]["steps_ratio_to_sgd"] == 0.5
    assert by["grad-mimic[zero]"]["steps_to_sgd_accuracy"] is None and by["grad-mimic[noisy]"]["steps_to_sgd_accuracy"] == 20
    lift = summary["lift"]
    assert lift["best_control_auroc"] == "zero" and lift["auroc_lift"] == pytest.approx(0.95 - 0.98)  # either sign: 1 - 0.02
    assert lift["best_control_accuracy"] == "noisy" and lift["accuracy_gain"] == pytest.approx(0.05)
    assert summary["goal"]["holds"] and summary["goal"]["closest"] == "grad-mimic[noisy]"
    assert summary["goal"]["margin"] == pytest.approx(0.05)
    from raymimic_experiments.label_noise.report import reference_lift_lines

    assert any("<= 0" in line and "`zero`" in line for line in reference_lift_lines([summary]))


def test_cli_controls_print_config(capsys):
    job = load_job()
    assert job.main(["--controls", "zero", "random", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["controls"] == ["zero", "random"] and printed["eval_every"] == 5
    assert job.main(["--controls", "none", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["controls"] == []
    assert job.main(["--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["controls"] == list(CONTROL_REFERENCES)
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--controls", "bogus", "--print-config"])
    assert exit_info.value.code == 2 and "controls: unknown" in capsys.readouterr().err


def test_noisy_control_without_an_sgd_run(tmp_path):
    from raymimic_experiments.label_noise.simulate import simulate

    results, _, md_path = simulate(methods=["grad-mimic"], noise_levels=[0.5], controls=["noisy"], max_train=120,
                                   config=ClassifierTrainConfig(epochs=1, lr=3e-3, tau=0.3, eval_every=3), output_dir=str(tmp_path))
    assert [r["method"] for r in results["runs"]] == ["grad-mimic", "grad-mimic[noisy]"]
    assert 0 < results["controls"]["noisy_reference_test_accuracy"]["0.5"] <= 1  # an SGD model trained for the control alone
    summary = results["summary"][0]
    assert summary["goal"] is None and summary["sgd_steps"] is None and summary["lift"]["best_control_auroc"] == "noisy"
    assert all(r["steps_to_sgd_accuracy"] is None for r in results["runs"])
    assert [s for s, _ in results["runs"][0]["accuracy_curve"]] == [0, 3, 4]  # every 3 steps and the last (4 batches)
    assert "## Steps to reach" not in open(md_path).read()
