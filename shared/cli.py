"""Command-line entry points: a known error is one line on stderr, ``error: <message>``, and exit code 2.

::

    if __name__ == "__main__":
        run_trainer(main, CONFIG_CLASS)          # a trainer: main(parse_args(CONFIG_CLASS, argv))
        run_cli(main)                            # any other command: main(argv) -> exit code | None

Known errors are the toolkit's own (bad config, dataset layout or sample, weights, checkpoint, segmenter,
feature descriptor, run directory, non-finite loss, unavailable device), plus a ValueError or FileNotFoundError
raised by the toolkit's own code (its validation): their messages already say what is wrong and what to do, so
a traceback would only bury them. Anything else (a bug, a library error) keeps its traceback. ``--debug``
anywhere on the command line, or ``USS_DEBUG=1``, shows the traceback of known errors too. A run stopped by
SIGINT/SIGTERM (`shared.run_guard.RunInterrupted`) prints "stopped at step N; resume with --resume auto" and
exits with 128 + the signal number (130 / 143), so a scheduler sees that it did not finish.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from dinov2_patched.weights import WeightsLoadError, WeightsNotFoundError
from shared.checkpoint import CheckpointError
from shared.config import parse_args
from shared.config_types import ConfigError
from shared.data.errors import BadSampleError, DatasetLayoutError
from shared.dist import DeviceUnavailableError
from shared.features import DescriptorError
from shared.run_dir import RunDirError
from shared.run_guard import NonFiniteLossError, RunInterrupted
from shared.segmenter import SegmenterFormatError

EXIT_KNOWN_ERROR = 2
KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DatasetLayoutError, BadSampleError, WeightsNotFoundError, WeightsLoadError, CheckpointError,
    SegmenterFormatError, DescriptorError, RunDirError, NonFiniteLossError, DeviceUnavailableError,
)
# ValueError / FileNotFoundError count as known when the toolkit's own code raised them.
OWN_CHECKS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
REPO = Path(__file__).resolve().parents[1]


def _raised_by_toolkit(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is a file of this repository (not an installed one)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return path.is_relative_to(REPO) and not any(part in (".venv", "site-packages") for part in path.parts)


def is_known_error(error: BaseException) -> bool:
    """Whether ``error`` is printed as one line (see the module docstring)."""
    return isinstance(error, KNOWN_ERRORS) or (isinstance(error, OWN_CHECKS) and _raised_by_toolkit(error))


def one_line(error: BaseException) -> str:
    """The message on one line (a message that spans lines has them joined with spaces)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    if isinstance(error, KeyError) and len(error.args) == 1:  # str(KeyError) adds quotes
        text = str(error.args[0])
    return text or type(error).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("USS_DEBUG", "").strip() not in ("", "0")


def run_cli(fn: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Call ``fn(argv)`` (``--debug`` removed) and exit: with its int result, 0 for anything else, 2 for a known
    error (one line on stderr), 128 + signal for an interrupted run."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    args = [arg for arg in args if arg != "--debug"]
    try:
        result = fn(args)
    except RunInterrupted as stop:
        print(f"stopped at step {stop.step}; resume with --resume auto", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: stopped without saving", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as error:
        if debug or not is_known_error(error):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_KNOWN_ERROR)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses ``kind`` and refuses values below ``low`` (and NaN / infinity), so an
    option's range is checked like a config key's: ``parser.add_argument("--batch-size", type=at_least(1))``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; valid range: >= {low}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def positive_float(text: str) -> float:
    """An argparse ``type=`` for a finite number > 0."""
    value = at_least(0.0, float)(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range; valid range: > 0")
    return value


def run_trainer(main: Callable[[Any], Any], config_cls: type, argv: Sequence[str] | None = None) -> NoReturn:
    """``run_cli`` for a trainer: ``main(parse_args(config_cls, argv))``."""
    run_cli(lambda args: main(parse_args(config_cls, args)), argv)


__all__ = ["EXIT_KNOWN_ERROR", "KNOWN_ERRORS", "at_least", "is_known_error", "one_line", "positive_float",
           "run_cli", "run_trainer"]
