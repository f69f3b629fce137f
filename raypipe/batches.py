"""Random-window batches from the token memmaps (the reference script's get_batch), on the training device.

Batches are random windows of `block_size` tokens; `y` is `x` shifted by one. A window never crosses a
shard boundary: one draw over the window starts of all shards of the split, mapped to (shard, offset), so
a single-file directory draws the same windows as it always did. A fresh memmap is opened per batch for
each shard it touches, as in the reference script (a long-lived memmap keeps pages resident and grows the
process' memory).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .data import TOKEN_DTYPES, Shard, read_meta, split_files, split_seed, window_starts


def get_batch(split: str, block_size: int, batch_size: int, device: torch.device | str,
              device_type: Optional[str] = None, *, data_dir: str | Path, dtype: str = "uint16",
              generator: Optional[torch.Generator] = None,
              shards: Optional[list[Shard]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows from the split's token files: x [batch, block], y = x shifted by one (int64).

    `shards` (split_files(meta)[split]) is read from meta.json when not given. One draw over all window
    starts of the split, each start mapped to its shard and offset, so no window crosses a shard boundary
    and a single file draws what `randint(len(data) - block_size)` drew.
    """
    device = torch.device(device)
    device_type = device_type or device.type
    if shards is None:
        meta = read_meta(data_dir)
        shards, dtype = split_files(meta)[split], meta["dtype"]
    counts = window_starts(shards, block_size)
    ends = np.cumsum(counts)
    picks = torch.randint(int(ends[-1]), (batch_size,), generator=generator).numpy()
    which = np.searchsorted(ends, picks, side="right")  # shards without starts are never picked
    starts = picks - (ends - counts)[which]
    windows = np.empty((batch_size, block_size + 1), dtype=np.int64)
    for i in np.unique(which):
        rows = which == i
        data = np.memmap(Path(data_dir) / shards[i].file, dtype=TOKEN_DTYPES[dtype], mode="r")
        windows[rows] = data[starts[rows, None] + np.arange(block_size + 1)]  # one gather per shard
        del data
    windows = torch.from_numpy(windows)
    if device_type == "cuda":  # one pinned buffer, one asynchronous copy; x and y are views of it
        windows = windows.pin_memory().to(device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]
    return windows[:, :-1].contiguous().to(device), windows[:, 1:].contiguous().to(device)


class BatchSampler:
    """get_batch with its own seeded generator, so each rank and split draws its own stream."""

    def __init__(self, data_dir: str | Path, split: str, block_size: int, batch_size: int,
                 device: torch.device | str, seed: int, rank: int = 0, stream: str = "batches", from_step: int = 0):
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.batch_size, self.device = block_size, batch_size, torch.device(device)
        meta = read_meta(data_dir)
        self.dtype, self.shards = meta["dtype"], split_files(meta)[split]
        self.seed = split_seed(seed, rank, split, stream, from_step)
        self.generator = torch.Generator().manual_seed(self.seed)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    # The position in the stream, for checkpoints: the state after the last batch handed out.
    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(self.split, self.block_size, self.batch_size, self.device,
                         data_dir=self.data_dir, dtype=self.dtype, generator=self.generator, shards=self.shards)


class CudaPrefetcher:
    """A BatchSampler read ahead by a background thread: it draws the next `depth` batches and
    copies each to the GPU on its own stream while the training step computes, so the step's
    thread only picks up a batch that is already there (and the GPU waits for its copy, not the host).

    Same batches, same order as the sampler alone. `get_state` is the sampler's state before the
    next batch to be handed out, so a checkpoint resumes exactly there, not past the read-ahead.
    Restore a position into the sampler before wrapping it.
    """

    def __init__(self, sampler: BatchSampler, depth: int = 2):
        self.sampler = sampler
        index = sampler.device.index if sampler.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)  # the thread must name its device: "cuda" alone will not do
        self.stream = torch.cuda.Stream(self.device)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.next_item = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="raypipe-prefetch", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        while not self.stopped.is_set():
            try:
                with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                    state = self.sampler.get_state()
                    x, y = self.sampler()
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
                item = (x, y, copied, state)
            except BaseException as e:  # handed to the step's thread and raised there
                item = e
            while not self.stopped.is_set():
                try:
                    self.ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return

    def _peek(self):
        if self.next_item is None:
            self.next_item = self.ready.get()
            if isinstance(self.next_item, BaseException):
                raise self.next_item
        return self.next_item

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, copied, _ = self._peek()
        self.next_item = None
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)  # the GPU waits for the copy; the host does not
        x.record_stream(compute)  # allocated on the copy stream: keep it until compute is done with it
        return x, y

    def get_state(self) -> torch.Tensor:
        return self._peek()[3]

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
