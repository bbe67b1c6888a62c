"""The command lines: one resolved config per command and job (``--print-config``), overrides,
command-line errors (``error: ...``, exit status 2), choices from the registries, and tiny real
runs that need no Ray. Nothing here starts Ray."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymimic.app.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAIN_IO = ["--pool", "/data/pool", "--reference", "ViT-B-32:datacomp_m_s128m_b4k", "--output", "/runs/r1"]


@pytest.fixture
def config_of(capsys):
    """``raymimic ARGV --print-config`` in this process -> the printed config as a dict."""

    def run(*argv: str) -> dict:
        assert main([*argv, "--print-config"]) == 0
        out = capsys.readouterr().out
        return json.loads(out)

    return run


@pytest.fixture
def error_of(capsys):
    """``raymimic ARGV`` must fail as a command-line mistake: exit status 2, ``error:`` line, no traceback."""

    def run(*argv: str, one_line: bool = True) -> str:
        with pytest.raises(SystemExit) as exited:
            main(list(argv))
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        if one_line:
            assert len(lines) == 1, err
        assert lines[-1].startswith(f"raymimic {argv[0]}: error: ")
        return lines[-1]

    return run


# -- raymimic train ---------------------------------------------------------------------------

def test_train_preset_plus_overrides_is_one_config(config_of):
    cfg = config_of("train", "--preset", "tiny", "--model", "ViT-B-32", "--global-batch", "4096", "--samples-seen", "8192", *TRAIN_IO)
    assert cfg["model"] == "ViT-B-32" and cfg["global_batch"] == 4096 and cfg["samples_seen"] == 8192
    assert cfg["lr"] == 1e-3 and cfg["warmup"] == 2  # not given: the tiny preset's
    assert cfg["pool"] == "/data/pool" and cfg["reference"] == "ViT-B-32:datacomp_m_s128m_b4k" and cfg["output"] == "/runs/r1"


def test_train_cluster_settings_are_config_fields_and_no_test_hook_is(config_of, error_of):
    cfg = config_of("train", *TRAIN_IO, "--collective-timeout-s", "30", "--resources-per-worker", "trainer_slot=1,ssd=0.5")
    assert cfg["collective_timeout_s"] == 30 and cfg["resources_per_worker"] == {"trainer_slot": 1.0, "ssd": 0.5}
    assert not {"extra", "crash_at_step", "crash_rank"} & set(cfg)
    assert "NAME=AMOUNT" in error_of("train", *TRAIN_IO, "--resources-per-worker", "trainer_slot", "--print-config", one_line=False)
    assert "may not set 'GPU'" in error_of("train", *TRAIN_IO, "--resources-per-worker", "GPU=1", "--print-config")


def test_filter_task_resources_are_a_config_field(config_of, error_of):
    cfg = config_of("filter", "--scores", "S", "--output", "O", "--task-resources", "cpu_node=1,ssd=0.5")
    assert cfg["task_resources"] == {"cpu_node": 1.0, "ssd": 0.5}
    assert config_of("filter", "--scores", "S", "--output", "O")["task_resources"] is None
    assert "NAME=AMOUNT" in error_of("filter", "--scores", "S", "--output", "O", "--task-resources", "cpu_node", "--print-config",
                                     one_line=False)
    assert "may not set 'CPU'" in error_of("filter", "--scores", "S", "--output", "O", "--task-resources", "CPU=1", "--print-config")
    assert "amount > 0" in error_of("filter", "--scores", "S", "--output", "O", "--task-resources", "cpu_node=0", "--print-config")


def test_train_preset_override_that_breaks_the_preset_is_an_error(error_of):
    line = error_of("train", "--preset", "tiny", "--model", "ViT-B-32", "--global-batch", "4096", *TRAIN_IO, "--print-config")
    assert "samples_seen" in line and "global_batch" in line


@pytest.mark.parametrize("preset", ["tiny", "toy", "small", "medium", "large", "xlarge"])
def test_train_presets_fill_what_is_not_given(config_of, preset):
    from raymimic.train.config import PRESETS

    cfg = config_of("train", "--preset", preset, *TRAIN_IO)
    assert {k: cfg[k] for k in PRESETS[preset]} == PRESETS[preset]


def test_train_default_preset_and_dataclass_defaults(config_of):
    from raymimic.train.config import DEFAULT_PRESET, PRESETS, TrainConfig

    cfg = config_of("train", *TRAIN_IO)
    expected = TrainConfig.from_preset(DEFAULT_PRESET, pool="/data/pool", reference="ViT-B-32:datacomp_m_s128m_b4k", output="/runs/r1")
    assert cfg == json.loads(expected.to_json())
    assert cfg["model"] == PRESETS[DEFAULT_PRESET]["model"] and cfg["tau"] == 0.05 and cfg["mimic_layer"] == "image-mlp"
    assert cfg["reweight_all"] is False
    assert cfg["weighting"] == "sgd"  # uniform weights while recording: the measured default (docs/findings.md)
    plain = config_of("train", "--pool", "P", "--output", "O", "--weighting", "sgd")  # plain training, no scores: said explicitly
    assert plain["reference"] is None and plain["weighting"] == "sgd"


@pytest.mark.parametrize("option, field, value", [
    (["--tau", "0.2"], "tau", 0.2),
    (["--weighting", "sgd"], "weighting", "sgd"),
    (["--weighting", "rho"], "weighting", "rho"),
    (["--mimic-layer", "text-mlp"], "mimic_layer", "text-mlp"),
    (["--mimic-layer", "visual.proj"], "mimic_layer", "visual.proj"),  # any parameter name, not only an alias
    (["--score-kind", "cos"], "score_kind", "cos"),
    (["--reweight-all"], "reweight_all", True),
    (["--gpu"], "use_gpu", True),
    (["--workers", "4"], "workers", 4),
    (["--cpus-per-worker", "2"], "cpus_per_worker", 2.0),
    (["--checkpoint-every", "7"], "checkpoint_every", 7),
    (["--max-failures", "1"], "max_failures", 1),
    (["--seed", "3"], "seed", 3),
    (["--shuffle-buffer", "10"], "shuffle_buffer", 10),
    (["--lr", "0.01"], "lr", 0.01),
    (["--warmup", "9"], "warmup", 9),
    (["--weight-decay", "0.1"], "weight_decay", 0.1),
    (["--precision", "fp32"], "precision", "fp32"),
    (["--grad-checkpointing"], "grad_checkpointing", True),
    (["--pretrained", "/ckpt/start.pt"], "pretrained", "/ckpt/start.pt"),
    (["--min-workers", "2", "--max-workers", "8"], "max_workers", 8),
    (["--direction", "fixed"], "direction", "fixed"),
    (["--direction", "function"], "direction", "function"),
    (["--controls", "zero,function"], "controls", ["zero", "function"]),
    (["--init-seed", "5"], "init_seed", 5),
    (["--controls", "zero,init,random,b16=ViT-B-32:openai"], "controls", ["zero", "init", "random", "b16=ViT-B-32:openai"]),
    (["--controls", "none"], "controls", []),
    (["--baselines", "loss,ref_loss,rho,ref_clipscore"], "baselines", ["loss", "ref_loss", "rho", "ref_clipscore"]),
])
def test_train_every_option_takes_effect(config_of, option, field, value):
    cfg = config_of("train", "--preset", "toy", *TRAIN_IO, *option)
    assert cfg[field] == value
    assert cfg["model"] == "raymimic-small"  # the preset still fills the rest


def test_train_smoke_is_the_tiny_preset_plus_overrides(config_of, tmp_path):
    out = tmp_path / "smoke"
    cfg = config_of("train", "--smoke", "--output", str(out))
    assert cfg["model"] == "raymimic-tiny" and cfg["samples_seen"] == 64 and cfg["global_batch"] == 8
    assert cfg["workers"] == 2 and cfg["use_gpu"] is False and cfg["cpus_per_worker"] == 0.5 and cfg["checkpoint_every"] == 4
    assert cfg["pool"] == str(out / "toy_pool") and cfg["reference"] == str(out / "reference.pt")
    assert not out.exists()  # --print-config writes nothing
    given = config_of("train", "--smoke", "--output", str(out), "--workers", "1", "--tau", "0.5", "--reference", "R",
                      "--checkpoint-every", "2")
    assert given["workers"] == 1 and given["tau"] == 0.5 and given["reference"] == "R" and given["checkpoint_every"] == 2
    assert config_of("train", "--smoke")["model"] == "raymimic-tiny"  # no --output: a temporary folder when it runs


@pytest.mark.parametrize("argv, words", [
    (["--pool", "P", "--reference", "R"], ["--output"]),
    (["--output", "O", "--reference", "R"], ["--pool"]),
    (["--preset", "tiny", *TRAIN_IO, "--tau", "0"], ["tau"]),
    (["--preset", "tiny", *TRAIN_IO, "--tau", "-1"], ["tau"]),
    (["--preset", "tiny", "--pool", "P", "--output", "O"], ["--reference is required"]),  # nothing to score against
    (["--preset", "tiny", "--pool", "P", "--output", "O", "--weighting", "grad-mimic"], ["reference"]),
    (["--preset", "tiny", *TRAIN_IO, "--workers", "0"], ["workers"]),
    (["--preset", "tiny", *TRAIN_IO, "--min-workers", "4", "--max-workers", "2"], ["min_workers"]),
])
def test_train_command_line_mistakes_exit_2(error_of, argv, words):
    line = error_of("train", *argv, "--print-config")
    assert all(word in line for word in words), line


def test_train_controls_direction_and_baselines(config_of, error_of):
    cfg = config_of("train", "--preset", "tiny", *TRAIN_IO)
    assert cfg["controls"] == ["zero", "fixed"] and cfg["direction"] == "current" and cfg["baselines"] == []
    # direction fixed: the default set drops the fixed control (it would repeat the score); current is allowed
    assert config_of("train", "--preset", "tiny", *TRAIN_IO, "--direction", "fixed")["controls"] == ["zero"]
    assert config_of("train", "--preset", "tiny", *TRAIN_IO, "--direction", "fixed", "--controls", "zero,current")["controls"] == [
        "zero", "current"]
    # no reference: no score, the default set is empty; zero, init and the loss baseline still work
    plain = ["train", "--preset", "tiny", "--pool", "P", "--output", "O", "--weighting", "sgd"]
    assert config_of(*plain)["controls"] == [] and config_of(*plain)["baselines"] == []
    cfg = config_of(*plain, "--controls", "zero,init", "--baselines", "loss")
    assert cfg["controls"] == ["zero", "init"] and cfg["baselines"] == ["loss"]
    for argv, words in [
        ([*TRAIN_IO, "--controls", "zero,nope"], ["unknown control 'nope'"]),
        ([*TRAIN_IO, "--controls", "zero,zero"], ["more than once"]),
        ([*TRAIN_IO, "--controls", "Bad=ViT-B-32:openai"], ["[a-z0-9_]+"]),
        ([*TRAIN_IO, "--controls", "fixed=ViT-B-32:openai"], ["taken"]),
        ([*TRAIN_IO, "--controls", "current"], ["repeat the primary score"]),
        ([*TRAIN_IO, "--direction", "fixed", "--controls", "fixed"], ["repeat the primary score"]),
        ([*TRAIN_IO, "--baselines", "clip"], ["unknown baseline"]),
        ([*plain[3:], "--controls", "random"], ["needs a reference"]),
        ([*plain[3:], "--baselines", "rho"], ["needs a reference"]),
        ([*plain[3:], "--direction", "fixed"], ["needs a reference"]),
        ([*plain[3:], "--direction", "function"], ["needs a reference"]),
        ([*TRAIN_IO, "--init-seed", "1", "--pretrained", "/ckpt/start.pt"], ["init_seed", "pretrained"]),
    ]:
        line = error_of("train", "--preset", "tiny", *argv, "--print-config")
        assert all(word in line for word in words), line
    assert "direction" in error_of("train", *TRAIN_IO, "--direction", "sideways", one_line=False)


def test_train_choices_come_from_the_registries(error_of, config_of):
    from raymimic.mimic.weighting import WEIGHTINGS

    for name in WEIGHTINGS:
        assert config_of("train", "--preset", "tiny", *TRAIN_IO, "--weighting", name)["weighting"] == name
    line = error_of("train", *TRAIN_IO, "--weighting", "nope", one_line=False)
    assert all(name in line for name in WEIGHTINGS)


def test_help_lists_registries_and_dataclass_defaults(capsys, monkeypatch):
    from raymimic.clip.layers import ALIASES
    from raymimic.mimic.weighting import WEIGHTINGS
    from raymimic.select.binarize import FEATURES
    from raymimic.select.mimic_filter import MIMIC_METHODS
    from raymimic.train.config import DEFAULT_MIMIC_LAYER, DEFAULT_TAU, PRESETS

    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping: names stay whole

    def help_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as exited:
            main([*argv, "--help"])
        assert exited.value.code == 0
        return capsys.readouterr().out

    train = help_of("train")
    assert all(name in train for name in [*WEIGHTINGS, *ALIASES, *PRESETS])
    assert f"default: {DEFAULT_TAU}" in train and f"default: {DEFAULT_MIMIC_LAYER}" in train and "--reweight-all" in train
    assert "--controls" in train and "default: zero,fixed" in train and "--direction" in train and "--baselines" in train
    assert all(name in train for name in ("zero", "init", "random", "NAME=SPEC", "ref_clipscore", "rho"))
    filt = help_of("filter")
    assert all(name in filt for name in [*MIMIC_METHODS, *FEATURES]) and "default: gmm" in filt
    score = help_of("score")
    assert all(name in score for name in ALIASES) and "--controls" in score and "--baselines" in score
    simulate = help_of("simulate")
    assert all(name in simulate for name in WEIGHTINGS) and "docs/simulation.md" in simulate
    assert "86%" not in simulate and "97%" not in simulate and "0.99" not in simulate
    for command in ("quickstart", "make-toy-pool", "report"):
        assert "--print-config" in help_of(command)


# -- the other commands ---------------------------------------------------------------------

def test_score_config(config_of, error_of):
    base = ["score", "--pool", "P", "--model", "ViT-B-32", "--reference", "R", "--output", "O"]
    cfg = config_of(*base)
    assert cfg == {"pool": "P", "model": "ViT-B-32", "reference": "R", "output": "O", "checkpoint": None, "mimic_layer": "image-mlp",
                   "score_kind": "proj", "tau": 0.05, "controls": ["zero"], "baselines": [], "batch_size": 256, "actors": 1,
                   "use_gpu": False, "step": None}  # the default controls without fixed: at a checkpoint it repeats the score
    cfg = config_of(*base, "--controls", "zero,random,b16=ViT-B-32:openai", "--baselines", "ref_clipscore,loss")
    assert cfg["controls"] == ["zero", "random", "b16=ViT-B-32:openai"] and cfg["baselines"] == ["ref_clipscore", "loss"]
    assert "degenerate" in error_of(*base, "--controls", "zero,init", "--print-config")
    assert "repeat the primary score" in error_of(*base, "--controls", "fixed", "--print-config")
    cfg = config_of(*base, "--checkpoint", "s3://b/final.pt", "--mimic-layer", "text-mlp", "--score-kind", "cos", "--tau", "0.5",
                    "--batch-size", "64", "--actors", "3", "--gpu", "--step", "11")
    assert cfg["checkpoint"] == "s3://b/final.pt" and cfg["mimic_layer"] == "text-mlp" and cfg["score_kind"] == "cos"
    assert cfg["tau"] == 0.5 and cfg["batch_size"] == 64 and cfg["actors"] == 3 and cfg["use_gpu"] is True and cfg["step"] == 11
    assert "tau" in error_of(*base, "--tau", "0", "--print-config")
    assert "--output" in error_of("score", "--pool", "P", "--model", "M", "--reference", "R", "--print-config", one_line=False)


def test_filter_config(config_of, error_of):
    cfg = config_of("filter", "--scores", "RUN/scores", "--output", "OUT")
    assert cfg["method"] == "gmm" and cfg["fraction"] == 0.3 and cfg["rule"] == "majority" and cfg["pool"] is None
    cfg = config_of("filter", "--scores", "S", "--output", "O", "--method", "top-fraction", "--fraction", "0.8", "--pool", "P",
                    "--clip-top", "0.3", "--basic", "--rule", "0.6", "--feature", "score", "--report", "--fit-sample", "500")
    assert cfg["method"] == "top-fraction" and cfg["fraction"] == 0.8 and cfg["clip_top"] == 0.3 and cfg["basic"] is True
    assert cfg["rule"] == 0.6 and cfg["feature"] == "score" and cfg["report"] is True and cfg["fit_sample"] == 500
    assert "--pool" in error_of("filter", "--scores", "S", "--output", "O", "--clip-top", "0.3", "--print-config")
    assert "fraction" in error_of("filter", "--scores", "S", "--output", "O", "--method", "top-fraction", "--fraction", "1.5",
                                  "--print-config")
    assert "rule" in error_of("filter", "--scores", "S", "--output", "O", "--rule", "most", "--print-config")
    assert cfg["score_column"] == "score" and cfg["paper_rule"] is False and cfg["ground_truth"] is None
    cfg = config_of("filter", "--scores", "S", "--output", "O", "--score-column", "zero", "--ground-truth", "POOL/ground_truth.parquet")
    assert cfg["score_column"] == "score_zero" and cfg["ground_truth"] == "POOL/ground_truth.parquet"
    assert config_of("filter", "--scores", "S", "--output", "O", "--score-column", "score_fixed")["score_column"] == "score_fixed"
    assert config_of("filter", "--scores", "S", "--output", "O", "--method", "ensemble", "--paper-rule")["paper_rule"] is True
    # the paper's DataComp rules by name expand into the options that spell them out
    from raymimic.select.names import PAPER_DATACOMP_RULES

    for rule, (fraction, clip_top) in PAPER_DATACOMP_RULES.items():
        cfg = config_of("filter", "--scores", "S", "--output", "O", "--pool", "P", "--paper-datacomp", rule)
        assert (cfg["method"], cfg["fraction"], cfg["clip_top"], cfg["paper_datacomp"]) == ("top-fraction", fraction, clip_top, rule)
    assert PAPER_DATACOMP_RULES["clip30-minus15"] == (0.85, 0.3) and PAPER_DATACOMP_RULES["top40"] == (0.4, None)
    assert config_of("filter", "--scores", "S", "--output", "O", "--paper-datacomp", "top35")["fraction"] == 0.35  # no pool needed
    assert "give --pool" in error_of("filter", "--scores", "S", "--output", "O", "--paper-datacomp", "clip30-minus20")
    assert "drop --method/--fraction" in error_of("filter", "--scores", "S", "--output", "O", "--paper-datacomp", "top30",
                                                  "--fraction", "0.5")
    assert "drop --clip-top 0.5" in error_of("filter", "--scores", "S", "--output", "O", "--pool", "P", "--paper-datacomp",
                                              "clip30-minus15", "--clip-top", "0.5")
    assert "give one" in error_of("filter", "--scores", "S", "--output", "O", "--paper-datacomp", "top30", "--paper-rule")
    assert "invalid choice" in error_of("filter", "--scores", "S", "--output", "O", "--paper-datacomp", "top50", one_line=False)
    assert "primary score only" in error_of("filter", "--scores", "S", "--output", "O", "--score-column", "zero", "--feature",
                                            "norm_weight", "--print-config")
    assert "score column 'Zero' is not valid" in error_of("filter", "--scores", "S", "--output", "O", "--score-column", "Zero",
                                                          "--print-config")
    assert "top-fraction" in error_of("filter", "--scores", "S", "--output", "O", "--method", "top-fraction", "--paper-rule",
                                      "--print-config")
    assert config_of("filter", "--scores", "S", "--output", "O", "--pool", "P", "--gallery")["gallery"] is True
    assert "--gallery shows the pool's images: give --pool" in error_of("filter", "--scores", "S", "--output", "O", "--gallery",
                                                                        "--print-config")


def test_filter_missing_option_is_the_config_field_and_keeps_its_former_name(config_of, error_of):
    assert config_of("filter", "--scores", "S", "--output", "O")["missing"] == "drop"
    assert config_of("filter", "--scores", "S", "--output", "O", "--missing", "keep")["missing"] == "keep"
    assert config_of("filter", "--scores", "S", "--output", "O", "--unscored", "error")["missing"] == "error"
    assert "invalid choice" in error_of("filter", "--scores", "S", "--output", "O", "--missing", "ignore", one_line=False)


def test_quickstart_config(config_of):
    from raymimic_experiments.quickstart import QuickstartConfig

    assert config_of("quickstart") == QuickstartConfig().to_dict()
    cfg = config_of("quickstart", "--output", "/tmp/qs", "--samples", "500", "--noise", "0.2", "--epochs", "2", "--tau", "0.5",
                    "--method", "gmm", "--stage1-weighting", "grad-mimic", "--workers", "1", "--seed", "4")
    assert {k: cfg[k] for k in ("output", "samples", "noise", "epochs", "tau", "method", "stage1_weighting", "workers", "seed")} == {
        "output": "/tmp/qs", "samples": 500, "noise": 0.2, "epochs": 2, "tau": 0.5, "method": "gmm",
        "stage1_weighting": "grad-mimic", "workers": 1, "seed": 4}


def test_quickstart_errors(error_of):
    assert "noise" in error_of("quickstart", "--noise", "1", "--print-config")
    assert "tau" in error_of("quickstart", "--tau", "0", "--print-config")


def test_simulate_config(config_of, error_of):
    from raymimic.mimic.weighting import WEIGHTINGS

    cfg = config_of("simulate", "--tau", "0.7", "--noise", "0.5")
    assert cfg["tau"] == 0.7 and cfg["noise_levels"] == [0.5]
    assert cfg["epochs"] == 10 and cfg["lr"] == 3e-3 and cfg["methods"] == list(WEIGHTINGS) and cfg["output"] == "simulation-results"
    cfg = config_of("simulate", "--methods", "sgd", "agra", "--noise", "0.2", "0.3", "--model", "mlp", "--reweight-all",
                    "--epochs", "3", "--vote-rule", "all", "--threads", "2", "--save-scores", "--max-train", "100")
    assert cfg["methods"] == ["sgd", "agra"] and cfg["noise_levels"] == [0.2, 0.3] and cfg["model"] == "mlp"
    assert cfg["reweight_all"] is True and cfg["epochs"] == 3 and cfg["vote_rule"] == "all" and cfg["threads"] == 2
    assert cfg["save_scores"] is True and cfg["max_train"] == 100
    assert "noise_levels" in error_of("simulate", "--noise", "1.5", "--print-config")
    assert "tau" in error_of("simulate", "--tau", "0", "--print-config")
    assert "model" in error_of("simulate", "--model", "resnet", "--print-config")
    assert "data_dir" in error_of("simulate", "--dataset", "cifar10", "--print-config")


def test_make_toy_pool_config(config_of, error_of):
    cfg = config_of("make-toy-pool", "--output", "/tmp/toy", "--samples", "100")
    assert cfg == {"output": "/tmp/toy", "samples": 100, "noise": 0.3, "seed": 0, "shard_size": 10000, "eval_samples": 1600,
                   "image_size": 32, "workers": None, "images": "shapes", "relabel": 0.0, "relabel_pairs": 4}
    cfg = config_of("make-toy-pool", "--output", "/tmp/toy", "--samples", "100", "--noise", "0.5", "--images", "digits",
                    "--shard-size", "10", "--seed", "2", "--workers", "1", "--relabel", "0.04", "--relabel-pairs", "2")
    assert cfg["noise"] == 0.5 and cfg["images"] == "digits" and cfg["shard_size"] == 10 and cfg["seed"] == 2 and cfg["workers"] == 1
    assert cfg["relabel"] == 0.04 and cfg["relabel_pairs"] == 2
    assert "relabel_pairs=6" in error_of("make-toy-pool", "--output", "x", "--samples", "10", "--images", "digits", "--relabel", "0.05",
                                         "--relabel-pairs", "6", "--print-config")
    assert "noise" in error_of("make-toy-pool", "--output", "x", "--samples", "10", "--noise", "2", "--print-config")


def test_report_config(config_of):
    assert config_of("report", "/runs/filter") == {"output": "/runs/filter"}


# -- jobs/ and import weight ----------------------------------------------------------------

_PROBE = """
import json, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
sys.argv = [target, *argv]
try:
    if target == "raymimic":
        from raymimic.app.cli import main
        code = main(argv)
    else:
        runpy.run_path(target, run_name="__main__")
        code = 0
except SystemExit as exited:
    code = exited.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "ray") if m in sys.modules)}), file=sys.stderr)
"""


def _probe(target: str, *argv: str) -> tuple[dict, dict]:
    """Run a command or job script in a fresh interpreter; return (printed config, {code, heavy modules imported})."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", _PROBE, target, *argv, "--print-config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    status = json.loads(done.stderr.strip().splitlines()[-1])
    return (json.loads(done.stdout) if status["code"] == 0 else {}), status


@pytest.mark.parametrize("script, preset", [("jobs/datacomp_small.py", "small"), ("jobs/datacomp_medium.py", "medium")])
def test_datacomp_jobs_print_their_preset_with_overrides(script, preset):
    from raymimic.train.config import PRESETS

    cfg, status = _probe(script, *TRAIN_IO, "--workers", "8", "--gpu", "--tau", "0.1")
    assert status == {"code": 0, "heavy": []}
    assert {k: cfg[k] for k in PRESETS[preset]} == PRESETS[preset]
    assert cfg["workers"] == 8 and cfg["use_gpu"] is True and cfg["tau"] == 0.1
    smoke, status = _probe(script, "--smoke", "--output", "/tmp/raymimic-never-written")
    assert status["code"] == 0 and smoke["model"] == "raymimic-tiny" and smoke["pool"] == "/tmp/raymimic-never-written/toy_pool"
    assert not Path("/tmp/raymimic-never-written").exists()


def test_datacomp_job_error_exits_2():
    _, status = _probe("jobs/datacomp_small.py", *TRAIN_IO, "--global-batch", "100000000")
    assert status["code"] == 2


def test_quickstart_and_simulation_jobs_print_their_config():
    cfg, status = _probe("jobs/quickstart.py", "--samples", "300")
    assert status == {"code": 0, "heavy": []} and cfg["samples"] == 300
    cfg, status = _probe("jobs/simulation.py", "--tau", "0.7", "--noise", "0.5")
    assert status["code"] == 0 and cfg["tau"] == 0.7 and cfg["noise_levels"] == [0.5]
    assert "ray" not in status["heavy"]


@pytest.mark.parametrize("argv", [
    ["train", *TRAIN_IO],
    ["score", "--pool", "P", "--model", "M", "--reference", "R", "--output", "O"],
    ["filter", "--scores", "S", "--output", "O"],
    ["quickstart"],
    ["make-toy-pool", "--output", "O", "--samples", "5"],
    ["report", "O"],
])
def test_print_config_imports_neither_torch_nor_ray(argv):
    _, status = _probe("raymimic", *argv)
    assert status == {"code": 0, "heavy": []}


# -- tiny real runs (no Ray) ----------------------------------------------------------------

def test_make_toy_pool_runs(tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["make-toy-pool", "--output", str(out), "--samples", "12", "--noise", "0.5", "--shard-size", "6",
                 "--eval-samples", "4", "--images", "digits", "--workers", "1"]) == 0
    assert "wrote 12 samples in 2 shards" in capsys.readouterr().out
    summary = json.loads((out / "toy_pool.json").read_text())
    assert summary["samples"] == 12 and summary["noise"] == 0.5 and summary["images"] == "digits" and summary["eval_samples"] == 4


def test_simulate_runs(tmp_path, capsys):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "sim"
    assert main(["simulate", "--methods", "sgd", "grad-mimic", "--noise", "0.5", "--epochs", "1", "--max-train", "200",
                 "--controls", "none", "--output", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the caller's setting is restored
    results = json.loads((out / "results.json").read_text())
    assert results["noise_levels"] == [0.5] and {r["method"] for r in results["runs"]} == {"sgd", "grad-mimic"}
    assert results["n_train"] == 200 and results["config"]["epochs"] == 1 and results["config"]["tau"] == 0.3
    assert f"wrote {out / 'results.md'}" in capsys.readouterr().out
