"""Guards for a training loop: stop cleanly on non-finite losses and on SIGINT / SIGTERM.

::

    with StopSignal() as stop:
        for step in range(start, cfg.steps):
            loss = ...
            check_finite(loss, step)             # raises NonFiniteLossError before the bad step is applied
            ...
            if stop.sync():                      # any rank got SIGINT/SIGTERM (collective under DDP)
                save the checkpoint
                raise stop.interrupted(step)     # RunInterrupted: the CLI exits 130 (SIGINT) / 143 (SIGTERM)

``check_finite`` raises before ``backward()``/``optimizer.step()``, so the weights and the last checkpoint
written are still good. Under DDP it agrees across ranks (a tiny all-reduce), so every rank raises together
instead of one rank hanging in the next collective; every rank must therefore call it at the same steps.

``StopSignal`` replaces the SIGINT/SIGTERM handlers while the ``with`` block runs: the first signal only sets
``.requested`` so the loop can save and exit; a second one stops at once (``KeyboardInterrupt`` for SIGINT,
``SystemExit(128 + signum)`` otherwise). A repeat within ``duplicate_window_s`` (1 s) of the first is taken
as the same event delivered twice and ignored: under torchrun, Ctrl-C reaches each worker directly and again
through the agent, which then allows the workers 30 s to exit before killing them, so save promptly.
The previous handlers come back on exit. Signal handlers can only
be installed from the main thread; elsewhere StopSignal does nothing (``.requested`` stays False).

A run stopped by a signal did not finish, so it must not exit with code 0 (a scheduler would take it as done):
after saving, raise ``RunInterrupted`` (``stop.interrupted(step)``); ``shared.cli.run_cli`` prints one line,
"stopped at step N; resume with --resume auto", and exits with 128 + the signal number. Save at the stop step
without an extra validation: it would make the run differ from an uninterrupted one (a checkpoint chosen by
validation at a step the uninterrupted run never validates).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

import torch

from shared import dist as sdist

__all__ = ["NonFiniteLossError", "RunInterrupted", "check_finite", "StopSignal"]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; ``.step`` and ``.value`` say where."""

    def __init__(self, message: str, step: int, value: float) -> None:
        super().__init__(message)
        self.step = step
        self.value = value


def check_finite(loss: torch.Tensor | float, step: int, name: str = "loss") -> None:
    """Raise NonFiniteLossError if ``loss`` (a tensor of any shape, or a number) has a NaN or inf on any rank."""
    if isinstance(loss, torch.Tensor):
        flat = loss.detach().flatten()
        finite = torch.isfinite(flat)
        bad_here = not bool(finite.all())  # the one host sync of a good step
        value = float(flat[~finite][0]) if bad_here else 0.0  # the first bad element, for the message
    else:
        bad_here = not math.isfinite(float(loss))
        value = float(loss)
    if sdist.is_initialized() and sdist.get_world_size() > 1:
        flag = torch.tensor([1.0 if bad_here else 0.0], device=sdist.flag_device())
        bad_anywhere = bool(sdist.all_reduce_max(flag).item() > 0)
    else:
        bad_anywhere = bad_here
    if not bad_anywhere:
        return
    where = f"{value}" if bad_here else f"non-finite on another rank (here: {_as_number(loss)})"
    raise NonFiniteLossError(
        f"Non-finite {name} at step {step}: {where}. Training stopped before this step was applied; the last good "
        "checkpoint is kept unchanged. Lower the learning rate or check the inputs, then resume with --resume auto.",
        step,
        value if bad_here else float("nan"),
    )


def _as_number(loss: Any) -> float:
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().float().mean())
    return float(loss)


class RunInterrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving its checkpoint; ``.exit_code`` is 128 + the signal number."""

    def __init__(self, step: int, signal_name: str | None = None) -> None:
        self.step = int(step)
        self.signal_name = signal_name or "SIGTERM"
        self.exit_code = 128 + int(signal.Signals[self.signal_name])
        super().__init__(f"stopped at step {self.step} ({self.signal_name}); resume with --resume auto")


class StopSignal:
    """Context manager that turns SIGINT/SIGTERM into a ``requested`` flag (see module docstring)."""

    def __init__(
        self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM), duplicate_window_s: float = 1.0
    ) -> None:
        self.signals = signals
        self.duplicate_window_s = duplicate_window_s
        self.requested = False
        self.signal_name: str | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested and time.monotonic() - self._first_at < self.duplicate_window_s:
            # The same event delivered twice (Ctrl-C reaches torchrun's agent, which forwards it; schedulers
            # signal every process): not a request to stop at once.
            return
        if self.requested:
            self._restore()
            print(f"[stop] second signal ({name}): stopping now without saving.", file=sys.stderr, flush=True)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested = True
        self.signal_name = name
        self._first_at = time.monotonic()
        print(
            f"[stop] received {name}: saving a checkpoint and stopping after this step (send it again to stop now).",
            file=sys.stderr,
            flush=True,
        )

    def interrupted(self, step: int) -> RunInterrupted:
        """The exception to raise once the checkpoint of ``step`` is saved."""
        return RunInterrupted(step, self.signal_name)

    def sync(self) -> bool:
        """``requested`` on any rank (an all-reduce under DDP: call it on every rank at the same steps)."""
        if sdist.is_initialized() and sdist.get_world_size() > 1:
            flag = torch.tensor([1.0 if self.requested else 0.0], device=sdist.flag_device())
            return bool(sdist.all_reduce_max(flag).item() > 0)
        return self.requested
