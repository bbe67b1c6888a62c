"""``train_loop_per_worker``: what every Ray Train worker runs for Stage 1.

Model and optimizer follow DataComp's recipe (AdamW without weight decay on gains, biases and
the logit scale; cosine schedule with linear warm-up; the logit scale clamped to ln 100).
Data comes from ``get_dataset_shard("train")`` in a deterministic order (the trainer asks
Ray Data to preserve order), so a resumed attempt skips exactly the batches its checkpoint
already trained on and then sees the same batches as the failed attempt did.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from raymimic.score_table import ScoreTableWriter, discard_from_step
from raymimic.train.checkpoint import TrainState, load_train_checkpoint, save_train_checkpoint
from raymimic.train.config import TrainConfig, parse_control


# no weight decay on gains, biases and the temperature (open_clip's training recipe)
def _no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """open_clip's ``cosine_lr``: linear warm-up to ``lr``, then cosine decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_steps = max(1, cfg.total_steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / decay_steps)) * cfg.lr


def autocast_for(cfg: TrainConfig, device: torch.device):
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "amp_bf16")
    if cfg.precision == "amp_bf16" and device.type != "cuda":
        raise ValueError("precision 'amp_bf16' needs a GPU; use 'auto' or 'fp32' on CPU workers")
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


@dataclass(frozen=True)
class InjectedCrash:
    """A fault for tests: worker ``rank`` exits (``os._exit``) at ``step``, on the run's first attempt only."""

    step: int
    rank: int = 1

    def marker(self, output: str) -> str:
        """The file the crash leaves in the run's output, so a resumed attempt does not crash again."""
        return f"{output.rstrip('/')}/.crash-injected-step-{self.step}"


# set by tests on the driver (never by a run's settings); raymimic.train.trainer.build_trainer hands it to the workers
injected_crash: InjectedCrash | None = None


def _maybe_crash(crash: InjectedCrash | None, output: str, step: int, rank: int) -> None:
    if crash is None or step != crash.step or rank != crash.rank:
        return
    import fsspec

    marker = crash.marker(output)
    fs, path = fsspec.core.url_to_fs(marker)
    if fs.exists(path):
        return
    with fs.open(path, "w") as f:
        f.write("worker crashed here on purpose once\n")
    os._exit(1)


class _Worker:
    """One worker's model, optimizer, step, score writer and position in the data."""

    def __init__(self, cfg: TrainConfig):
        import ray.train
        import ray.train.torch

        from raymimic.clip import create_seeded_model, resolve_mimic_layer, transforms_for_model
        from raymimic.data.preprocess import split_tensor_tail
        from raymimic.mimic import get_parameter
        from raymimic.train.feed import DeferredCopy, DeviceFeed
        from raymimic.train.step import build_mimic_step, world

        self.cfg = cfg
        self.rank, self.world_size = world()
        self.device = ray.train.torch.get_device()
        self.local_batch = cfg.local_batch(self.world_size)

        # identical initialisation on every rank, seeded as open_clip_train seeds (init_seed: a reference's own initialisation)
        init_seed = cfg.seed if cfg.init_seed is None else cfg.init_seed
        model, _, _ = create_seeded_model(cfg.model, init_seed, pretrained=cfg.pretrained, device=self.device)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        self.optimizer = build_optimizer(model, cfg)
        # W_0 of the mimic layer (the init/fixed controls, direction fixed): this run's step 0, kept in checkpoints
        initial = get_parameter(model, resolve_mimic_layer(model, cfg.mimic_layer)).detach().float().clone()
        self.state, previous_grad = TrainState(world_size=self.world_size), None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                self.state, previous_grad, saved_initial = load_train_checkpoint(directory, model, self.optimizer, self.device)
            if saved_initial is not None:
                initial = saved_initial

        self.step_fn, _ = build_mimic_step(
            model, cfg.model, mimic_layer=cfg.mimic_layer, reference=cfg.reference, weighting=cfg.weighting, tau=cfg.tau,
            score_kind=cfg.score_kind, reweight_all=cfg.reweight_all, device=self.device, autocast=autocast_for(cfg, self.device),
            wrap=ray.train.torch.prepare_model, direction=cfg.direction, controls=[parse_control(c) for c in cfg.controls],
            baselines=cfg.baselines, initial_weight=initial, seed=cfg.seed, align_every=cfg.align_every,
        )
        self.unwrapped = model
        self.step_fn.previous_mean_grad = previous_grad
        self.logit_scale = getattr(model, "logit_scale", None)

        if self.rank == 0:  # rows of steps after the restored checkpoint belong to a failed attempt
            discard_from_step(cfg.scores_dir, self.state.step)
        if self.world_size > 1:
            torch.distributed.barrier()
        self.writer = ScoreTableWriter(cfg.scores_dir, self.rank, controls=self.step_fn.extra_names)
        # uint8 pixels (run_training's dataset) are normalised on the device as the model's transform would on the CPU
        split = split_tensor_tail(transforms_for_model(cfg.model)[0])
        self.feed = DeviceFeed(self.device, *(split[2:] if split is not None else (None, None)))
        self.scores = DeferredCopy(self._write_scores)  # a step's scores reach the writer at the next step

    # -- one optimizer update --------------------------------------------------------
    def train_step(self, batch: dict, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """One update on a batch (its ``uid`` column) whose images and texts are on the device already (:attr:`feed`)."""
        cfg, state = self.cfg, self.state
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(state.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        result = self.step_fn(images, texts)
        self.optimizer.step()
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(0, math.log(100))
        self.scores.push((batch["uid"], state.step, state.epoch, result.global_batch),
                         {"score": result.local_scores, "weight": result.local_weights, **result.local_extra})
        state.step += 1
        state.batches_in_epoch += 1
        return {"result": result}

    def _write_scores(self, context: tuple, arrays: dict[str, np.ndarray]) -> None:
        uids, step, epoch, global_batch = context
        score, weight = arrays.pop("score"), arrays.pop("weight")
        self.writer.add([str(u) for u in uids], step, epoch, score, weight, global_batch, extra=arrays)

    def flush_scores(self) -> None:
        """Every step's score rows so far into a score file."""
        self.scores.flush()
        self.writer.flush()

    def checkpoint(self, metrics: dict) -> None:
        import ray.train

        self.flush_scores()  # score rows first: a checkpoint only commits after every rank flushed
        self.state.world_size = self.world_size
        if self.rank == 0:
            directory = tempfile.mkdtemp(prefix="raymimic-ckpt-")
            save_train_checkpoint(directory, self.unwrapped, self.cfg.model, self.optimizer, self.state, self.step_fn.previous_mean_grad,
                                  initial_weight=self.step_fn.initial_weight)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_step_{self.state.step:010d}")
            shutil.rmtree(directory, ignore_errors=True)
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=f"checkpoint_step_{self.state.step:010d}")

    def save_final(self) -> None:
        from raymimic.clip.models import save_checkpoint

        if self.rank == 0:
            uri = f"{self.cfg.checkpoints_dir}/final.pt"
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.cfg.checkpoints_dir)
            fs.makedirs(path, exist_ok=True)
            save_checkpoint(self.unwrapped, uri, self.cfg.model, step=self.state.step, epoch=self.state.epoch)


def _metrics(worker: _Worker, results: list, elapsed: float, data_wait: float = 0.0) -> dict:
    from raymimic.train.step import all_reduce_sum

    losses = torch.stack([r.loss.float() for r in results])
    global_loss = all_reduce_sum(losses.mean().clone()) / worker.world_size
    scores = torch.cat([r.scores.float() for r in results])
    weights = torch.cat([r.weights.float() for r in results])
    batch = results[-1].global_batch
    # how close the reference is to the target's basis (the "aligned" control's latest fit)
    alignment = {f"alignment_{k}": v for k, v in (worker.step_fn.alignment or {}).items()}
    return {
        **alignment,
        "step": worker.state.step,
        "epoch": worker.state.epoch,
        "loss": float(global_loss),
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "frac_above_uniform": float((weights > 1.0 / batch).float().mean()),
        "samples_per_s": len(results) * batch / max(elapsed, 1e-9),
        # share of the interval this worker spent waiting for its next batch: near 1 means
        # the Ray Data pipeline, not the model, limits training (add CPUs or preprocess ahead)
        "data_wait_fraction": data_wait / max(elapsed, 1e-9),
        "lr": learning_rate(worker.state.step - 1, worker.cfg),
    }


class _Unseen:
    """The batches of an epoch after the first ``skip`` (trained on before the restored checkpoint); counts all it read."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip, self.seen = batches, skip, 0

    def __iter__(self):
        for batch in self.batches:
            self.seen += 1
            if self.seen > self.skip:
                yield batch


def train_loop_per_worker(config: dict, crash: InjectedCrash | None = None) -> None:
    """One worker's Stage 1 for the :class:`TrainConfig` as a dict (``crash``: a fault a test injects)."""
    import ray.train

    cfg = TrainConfig.from_dict(config)
    worker = _Worker(cfg)
    state = worker.state
    shard = ray.train.get_dataset_shard("train")
    progress = None
    if cfg.progress and worker.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=cfg.total_steps, initial=state.step, desc="stage 1", unit="step")
    interval_results, interval_start = [], time.perf_counter()
    since_flush, data_wait = 0, 0.0
    while state.step < cfg.total_steps:
        batches = _Unseen(shard.iter_batches(
            batch_size=worker.local_batch, batch_format="numpy", drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 100_003 + state.epoch * 1009 + worker.rank) if cfg.shuffle_buffer else None,
        ), skip=state.batches_in_epoch)
        waiting_since = time.perf_counter()
        for batch, images, texts in worker.feed(batches):
            data_wait += time.perf_counter() - waiting_since
            _maybe_crash(crash, cfg.output, state.step, worker.rank)
            interval_results.append(worker.train_step(batch, images, texts)["result"])
            since_flush += 1
            if progress is not None:
                progress.update(1)
            done = state.step >= cfg.total_steps
            at_checkpoint = done or state.step % cfg.checkpoint_interval == 0
            if at_checkpoint or state.step % cfg.log_every == 0:
                metrics = _metrics(worker, interval_results, time.perf_counter() - interval_start, data_wait)
                interval_results, interval_start, data_wait = [], time.perf_counter(), 0.0
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['loss']:.3f}", sps=f"{metrics['samples_per_s']:.0f}")
                if at_checkpoint:
                    worker.checkpoint(metrics)
                    since_flush = 0
                else:
                    ray.train.report(metrics)
            if since_flush >= cfg.score_flush_every:
                worker.flush_scores()
                since_flush = 0
            if done:
                break
            waiting_since = time.perf_counter()
        seen = batches.seen
        if state.step >= cfg.total_steps:
            break
        if seen == 0:
            raise RuntimeError(
                f"worker {worker.rank} got no full batch of {worker.local_batch} samples in epoch {state.epoch}: "
                f"the pool needs at least global_batch={cfg.global_batch} samples"
            )
        state.epoch += 1
        state.batches_in_epoch = 0
    if progress is not None:
        progress.close()
    worker.save_final()
