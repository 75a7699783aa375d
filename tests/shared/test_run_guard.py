"""shared.run_guard: non-finite loss detection and SIGINT/SIGTERM handling."""

from __future__ import annotations

import math
import signal
import threading

import pytest
import torch

from shared.run_guard import NonFiniteLossError, StopSignal, check_finite


def test_check_finite_passes_finite_values():
    check_finite(torch.tensor(1.5), step=3)
    check_finite(torch.tensor([0.0, -2.0]), step=3)
    check_finite(2.0, step=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises_with_step_value_and_checkpoint_note(bad):
    with pytest.raises(NonFiniteLossError) as err:
        check_finite(torch.tensor(bad), step=17)
    message = str(err.value)
    assert "step 17" in message and str(bad) in message and "last good checkpoint is kept" in message
    assert err.value.step == 17 and (math.isnan(err.value.value) if math.isnan(bad) else err.value.value == bad)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        check_finite(bad, step=4)


def test_check_finite_catches_one_bad_element():
    with pytest.raises(NonFiniteLossError, match="Non-finite aux_loss at step 2: nan"):
        check_finite(torch.tensor([1.0, float("nan"), 3.0]), step=2, name="aux_loss")


def test_first_signal_sets_flag_second_exits():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited, StopSignal(duplicate_window_s=0.0) as stop:
        assert not stop.requested and not stop.sync()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested and stop.sync() and stop.signal_name == "SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # second one: immediate exit
        pytest.fail("the second SIGTERM should have exited")
    assert exited.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_sigint_raises_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), StopSignal(duplicate_window_s=0.0) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_repeat_within_the_duplicate_window_is_ignored():
    """torchrun forwards the Ctrl-C a worker already got; that must not skip the checkpoint."""
    with StopSignal(duplicate_window_s=3600.0) as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"


def test_handlers_restored_after_normal_exit():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
    assert signal.getsignal(signal.SIGTERM) is before


def test_off_main_thread_is_a_harmless_noop():
    result = {}

    def body():
        with StopSignal() as stop:
            result["requested"] = stop.requested

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert result == {"requested": False} and signal.getsignal(signal.SIGTERM) is before
