"""A target built the way open_clip's training app builds its model: bit for bit the same initialisation."""
from __future__ import annotations

import pytest
import torch

from raymimic.clip import create_seeded_model, register_model_configs

MODEL = "raymimic-tiny"


class _Built(Exception):
    """Stops open_clip_train's main() right after it built the model."""


def _open_clip_train_model(seed: int, tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """The state dict open_clip_train.main.main() builds with ``--seed seed``, taken as it leaves create_model_and_transforms."""
    main = pytest.importorskip("open_clip_train.main", reason="open_clip_train's data dependencies (webdataset, braceexpand)")
    register_model_configs()
    real = main.create_model_and_transforms
    built = {}

    def capture(*args, **kwargs):
        model = real(*args, **kwargs)[0]
        built["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        raise _Built

    monkeypatch.setattr(main, "create_model_and_transforms", capture)
    monkeypatch.setattr(main, "setup_logging", lambda *args, **kwargs: None)  # it would set every logger of the process to INFO
    with pytest.raises(_Built):
        main.main(["--model", MODEL, "--seed", str(seed), "--logs", str(tmp_path / f"logs{seed}"), "--name", "init", "--report-to", ""])
    return built["state"]


def test_seeded_model_is_bitwise_open_clip_trains_initialisation(tmp_path, monkeypatch):
    theirs = _open_clip_train_model(3, tmp_path, monkeypatch)
    torch.manual_seed(12345)  # whatever state the generators were in before
    ours = create_seeded_model(MODEL, 3)[0].state_dict()
    assert list(ours) == list(theirs)
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    other = create_seeded_model(MODEL, 4)[0].state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], other[k])]
    # another seed: every randomly drawn matrix differs (biases, norms and the logit scale are constants)
    assert {k for k, v in ours.items() if v.ndim >= 2} <= set(changed)


def test_init_seed_option_reaches_the_config_and_refuses_pretrained():
    from raymimic.app.train_job import build_parser, resolve_config
    from raymimic.train.config import TrainConfig

    parser = build_parser("tiny")
    args = parser.parse_args(["--pool", "/tmp/p", "--reference", "R", "--output", "/tmp/o", "--init-seed", "7", "--seed", "2"])
    cfg = resolve_config(parser, args, "tiny")
    assert (cfg.init_seed, cfg.seed) == (7, 2)
    assert TrainConfig.from_preset("tiny", output="/tmp/o", reference="R").init_seed is None
    with pytest.raises(ValueError, match="init_seed .* pretrained"):
        TrainConfig.from_preset("tiny", output="/tmp/o", reference="R", init_seed=7, pretrained="/tmp/w.pt")
