"""The torch random streams of the virtual ranks one process runs (`micro_batches`).

A job of W processes with micro_batches=M computes what a data-parallel job of W·M ranks of `batch_size` images
computes. Virtual rank v = rank·M + m draws its dropout masks and sampling grids from the stream a real rank v
would have: `torch.manual_seed(seed + v)` at the start, then only its own micro-batches' draws. A process keeps the
M states (CPU generator and, on CUDA, its device's generator) and swaps the one of micro-batch m in around it.
With M = 1 the one stream is the process's own, as without micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from shared.checkpoint import CheckpointError, rng_state, set_rng_state


class RankStreams:
    """The torch RNG states of virtual ranks `rank·count ... rank·count + count - 1`."""

    def __init__(self, seed: int, rank: int, count: int, device: torch.device) -> None:
        self.first, self.count, self.device = rank * count, count, torch.device(device)
        self.states = []
        for v in range(self.first, self.first + count):
            torch.manual_seed(seed + v)  # what a real rank v seeds: ranks draw different dropout masks and grids
            self.states.append(self._capture())

    def _cuda_index(self) -> int | None:
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _capture(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self._cuda_index() is not None:
            state["cuda"] = torch.cuda.get_rng_state(self._cuda_index())
        return state

    def _apply(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self._cuda_index() is not None:
            torch.cuda.set_rng_state(state["cuda"], self._cuda_index())

    @contextmanager
    def use(self, m: int) -> Iterator[None]:
        """Run the block on micro-batch `m`'s stream (the global torch RNG), and keep where it left that stream."""
        self._apply(self.states[m])
        try:
            yield
        finally:
            self.states[m] = self._capture()

    def checkpoint_entries(self) -> list[dict]:
        """This process's entries of a checkpoint's `rng` list, one per virtual rank: `rng_state()` (python, numpy)
        with the torch streams of that rank, so the list has the layout a job of W·M real ranks writes."""
        base, index = rng_state(), self._cuda_index()
        entries = []
        for state in self.states:
            entry = {**base, "torch": state["torch"]}
            if "cuda" in state and "cuda" in base:
                entry["cuda"] = [state["cuda"] if i == index else s for i, s in enumerate(base["cuda"])]
            entries.append(entry)
        return entries

    def restore(self, saved: list[dict]) -> None:
        """Continue the streams of a checkpoint's `rng` list (entries of every virtual rank, checked by
        `check_job_size`); python and numpy take the first virtual rank's entry."""
        set_rng_state(saved[self.first])
        index = self._cuda_index()
        self.states = []
        for entry in saved[self.first:self.first + self.count]:
            state = {"torch": entry["torch"].cpu()}
            if index is not None and "cuda" in entry and index < len(entry["cuda"]):
                state["cuda"] = entry["cuda"][index].cpu()
            self.states.append(state)


def check_job_size(saved: list[dict] | dict | None, path: Path, world_size: int, micro_batches: int) -> None:
    """Refuse to resume a checkpoint written by a job of another number of (virtual) ranks: the effective batch,
    the index shards and the random streams all depend on it, so the run would not continue the same training."""
    n_saved = 1 if isinstance(saved, dict) else len(saved or [])
    if n_saved != world_size * micro_batches:
        raise CheckpointError(
            f"checkpoint {path} was written by a job of {n_saved} rank(s) (processes x micro_batches) but this one "
            f"runs {world_size} process(es) x micro_batches={micro_batches}; resume with "
            f"{max(n_saved // micro_batches, 1)} process(es), or start a new run with another name=...")
