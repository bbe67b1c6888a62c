"""Training checkpoints: an open_clip model file plus the state needed to resume exactly.

A Ray Train checkpoint directory holds

* ``model.pt``: ``{"name", "state_dict", "step", "epoch"}``, loadable by
  ``open_clip.create_model_and_transforms(name, pretrained=".../model.pt")`` (**contract**);
* ``train_state.pt``: optimizer state, the position in the data (epoch and batches already
  consumed in it), AGRA's previous batch gradient, and the world size it was written with.

The learning rate is a pure function of the step, so no scheduler state is needed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

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


def save_train_checkpoint(directory: str, model: nn.Module, model_name: str, optimizer, state: TrainState, previous_mean_grad=None) -> str:
    os.makedirs(directory, exist_ok=True)
    save_checkpoint(model, os.path.join(directory, MODEL_FILE), model_name, step=state.step, epoch=state.epoch)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "state": vars(state).copy(),
            "previous_mean_grad": None if previous_mean_grad is None else previous_mean_grad.cpu(),
        },
        os.path.join(directory, STATE_FILE),
    )
    return directory


def load_train_checkpoint(directory: str, model: nn.Module, optimizer, device) -> tuple[TrainState, torch.Tensor | None]:
    """Restore model and optimizer in place; returns the data position and AGRA's comparison."""
    model_state = torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(model_state["state_dict"])
    saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    previous = saved.get("previous_mean_grad")
    return TrainState(**saved["state"]), (None if previous is None else previous.to(device))
