"""Training checkpoints: an open_clip model file plus the state needed to resume exactly.

A Ray Train checkpoint directory holds

* ``model.pt``: ``{"name", "state_dict", "step", "epoch"}``, loadable by
  ``open_clip.create_model_and_transforms(name, pretrained=".../model.pt")`` (**contract**);
* ``train_state.pt``: optimizer state, the position in the data (epoch and batches already
  consumed in it), AGRA's previous batch gradient, the world size it was written with, and
  ``W_0`` (the mimic layer at step 0 of the run) when the ``init``/``fixed`` controls or
  ``direction="fixed"`` use it: a resumed attempt scores against the first attempt's ``W_0``.

The learning rate is a pure function of the step, so no scheduler state is needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from raymimic.clip.models import save_checkpoint
from raymimic.mimic.params import unwrap

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class TrainState:
    step: int = 0  # optimizer updates completed
    epoch: int = 0  # passes over the pool started
    batches_in_epoch: int = 0  # global batches of ``epoch`` already trained on
    world_size: int = 0


class Restored(NamedTuple):
    """What :func:`load_train_checkpoint` gives back beside the restored model and optimizer."""
    state: TrainState
    previous_mean_grad: torch.Tensor | None  # AGRA's comparison
    initial_weight: torch.Tensor | None  # W_0 of the mimic layer (None when the run did not keep it)


def _cpu(tensor):
    return None if tensor is None else tensor.detach().cpu()


def save_train_checkpoint(directory: str, model: nn.Module, model_name: str, optimizer, state: TrainState, previous_mean_grad=None,
                          initial_weight=None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_checkpoint(model, os.path.join(directory, MODEL_FILE), model_name, step=state.step, epoch=state.epoch)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "state": vars(state).copy(),
            "previous_mean_grad": _cpu(previous_mean_grad),
            "initial_weight": _cpu(initial_weight),
        },
        os.path.join(directory, STATE_FILE),
    )
    return directory


def load_train_checkpoint(directory: str, model: nn.Module, optimizer, device) -> Restored:
    """Restore model and optimizer in place; returns the data position, AGRA's comparison and ``W_0``."""
    model_state = torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(model_state["state_dict"])
    saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    previous, initial = saved.get("previous_mean_grad"), saved.get("initial_weight")
    return Restored(TrainState(**saved["state"]), None if previous is None else previous.to(device),
                    None if initial is None else initial.to(device))
