"""Host batches to the training device without stalling it, and the step's scores back one step late.

:class:`DeviceFeed` turns an iterator of numpy batches (``uid``, ``image``, ``text``) into
device tensors:

* images may arrive as uint8 (C x H x W pixels, a quarter of float32's bytes through the object
  store, the host and the bus) and are normalised on the device by the same element-wise
  operations, in the same order, as the CPU preprocessing (:class:`raymimic.data.preprocess.BatchTransform`:
  ``x / 255``, then ``(x - mean) / std``); float images pass through as they are;
* on CUDA every batch is first copied into a pinned host buffer (reused batch after batch), so
  the host-to-device copy is a real asynchronous DMA on a side stream;
* the next batch's copy is issued before the current batch is handed to the step, so it
  overlaps the step's compute.

:class:`DeferredCopy` starts the device-to-host copy of a step's score tensors right after the
step and hands them over at the next step (or at :meth:`~DeferredCopy.flush`), so the training
loop never waits for the GPU to finish a step before it queues the next one; the score-only pass
holds every micro-batch's copy until the end of its call (``depth=None``).

Plain torch, no Ray: the Stage-1 worker loop, the score-only pass and ``benchmarks/gpu_check.py``
share it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch


def normalise_images(pixels: torch.Tensor, mean: torch.Tensor | None, std: torch.Tensor | None) -> torch.Tensor:
    """uint8 N x C x H x W pixels -> float32 model input: ``x / 255``, then ``(x - mean) / std`` (CPU preprocessing's order)."""
    images = pixels.to(torch.float32).div_(255)
    if mean is not None:
        images.sub_(mean).div_(std)
    return images


class DeviceFeed:
    """Numpy batches -> ``(batch, images, texts)`` with ``images``/``texts`` on ``device``, one batch copied ahead.

    ``mean``/``std``: the model's normalisation (per channel), applied on the device to uint8 images.
    """

    def __init__(self, device: str | torch.device, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._pinned: dict[str, list[torch.Tensor | None]] = {}  # per column: two host buffers, used in turn
        self._copied: list[torch.cuda.Event | None] = [None, None]  # per turn: its buffers' last copy
        self._turn = 0

    def __call__(self, batches: Iterable[Mapping]) -> Iterator[tuple[Mapping, torch.Tensor, torch.Tensor]]:
        pending = None
        for batch in batches:
            upcoming = (batch, *self._start(batch))
            if pending is not None:
                yield self._finish(*pending)
            pending = upcoming
        if pending is not None:
            yield self._finish(*pending)

    def _host(self, column: str, values) -> torch.Tensor:
        """The column as a CPU tensor; on CUDA copied (once) into this turn's pinned buffer."""
        array = np.asarray(values)
        if not self.cuda:
            return torch.from_numpy(array if array.flags.writeable else array.copy())  # Ray hands out read-only arrays
        buffers = self._pinned.setdefault(column, [None, None])
        buffer = buffers[self._turn]
        if buffer is None or tuple(buffer.shape) != array.shape or buffer.numpy().dtype != array.dtype:
            dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
            buffer = buffers[self._turn] = torch.empty(array.shape, dtype=dtype, pin_memory=True)
        np.copyto(buffer.numpy(), array)
        return buffer

    def _start(self, batch: Mapping):
        """Issue the batch's host-to-device copies (on the side stream on CUDA); returns the device tensors and an event."""
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # this turn's pinned buffers were last read two batches ago: long done
        images = self._host("image", batch["image"])
        texts = self._host("text", batch["text"])
        if not self.cuda:
            return images.to(self.device), texts.to(self.device, torch.long), None
        with torch.cuda.stream(self.stream):
            images = images.to(self.device, non_blocking=True)
            texts = texts.to(self.device, torch.long, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self._copied[self._turn] = done
        self._turn = 1 - self._turn
        return images, texts, done

    def _finish(self, batch: Mapping, images: torch.Tensor, texts: torch.Tensor, done) -> tuple[Mapping, torch.Tensor, torch.Tensor]:
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            images.record_stream(torch.cuda.current_stream(self.device))
            texts.record_stream(torch.cuda.current_stream(self.device))
        if images.dtype == torch.uint8:
            images = normalise_images(images, self.mean, self.std)
        elif images.dtype != torch.float32:
            images = images.to(torch.float32)
        return batch, images, texts


class DeferredCopy:
    """Device tensors -> numpy later: :meth:`push` starts the copies, later pushes (or :meth:`flush`) deliver.

    ``deliver(context, arrays)`` receives what was pushed with the tensors as float32 numpy arrays, in push order.
    ``depth``: how many pushes stay pending: 1 (the training loop's) delivers each push at the next one, one step
    late; ``None`` delivers only at :meth:`flush` (the score-only pass: one wait per call, at its end).
    """

    def __init__(self, deliver: Callable[[object, dict[str, np.ndarray]], None], depth: int | None = 1):
        self.deliver = deliver
        self.depth = depth
        self._pending: list[tuple[object, dict[str, torch.Tensor], object]] = []

    def push(self, context, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start copying ``tensors`` to the host; pushes beyond ``depth`` are delivered now, oldest first."""
        copies, done = {}, None
        for name, tensor in tensors.items():
            tensor = tensor.detach().float()
            if tensor.is_cuda:
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                copies[name] = host
            else:
                copies[name] = tensor
        if any(t.is_cuda for t in tensors.values()):
            done = torch.cuda.Event()
            done.record()
        if self.depth is not None:
            while len(self._pending) >= self.depth:
                self._deliver_oldest()
        self._pending.append((context, copies, done))

    def flush(self) -> None:
        """Deliver everything pending (waits for its copies)."""
        while self._pending:
            self._deliver_oldest()

    def _deliver_oldest(self) -> None:
        context, copies, done = self._pending.pop(0)
        if done is not None:
            done.synchronize()
        self.deliver(context, {name: host.numpy() for name, host in copies.items()})
