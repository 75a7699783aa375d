"""The run directory's lock, the fresh-start and same-settings checks of `open_run`, and what overwrite=true removes.
A second process is a real one (flock locks belong to open files, so only another process shows the behaviour a
second trainer sees); a killed holder is SIGKILLed, the crash that runs no cleanup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shared.checkpoint import make_checkpoint, save_checkpoint
from shared.config import ConfigError, config_to_dict, load_config
from shared.config_ranges import resume_may_differ
from shared.run_config import RunConfig
from shared.run_dir import LOCK_NAME, RunDirError, RunLockedError, run_lock
from shared.run_start import RESUME_MAY_DIFFER, ResumeMismatchError, open_run, resume_differences

REPO = Path(__file__).resolve().parents[2]
HOLDER = textwrap.dedent("""
    import sys, time
    from shared.run_lock import run_lock
    with run_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
""")


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the lock of `run_dir` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        procs.append(hold_lock(run_dir))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_process_on_a_locked_run_directory_gets_a_one_line_error_naming_the_pid(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(RunLockedError) as error, run_lock(run_dir):
        pass
    message = str(error.value)
    assert f"pid {proc.pid}" in message and str(run_dir) in message and "\n" not in message


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run_dir / LOCK_NAME).read_text().startswith(f"pid {proc.pid}")  # the stale file is still there
    with run_lock(run_dir) as path:
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
    assert path.exists() and path.read_text() == ""  # released: kept (never deleted), emptied


def test_the_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(RuntimeError), run_lock(tmp_path):
        raise RuntimeError("crash")
    with run_lock(tmp_path):
        pass


def test_only_the_enabled_rank_locks(tmp_path, holder):
    holder(tmp_path / "run")
    with run_lock(tmp_path / "run", enabled=False) as path:  # rank != 0 under DDP
        assert path is None


def cfg(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_config(RunConfig, None, [f"output_root={tmp_path / 'runs'}", "name=r", *overrides])


def write_checkpoint(config: RunConfig, run_dir: Path) -> None:
    model = torch.nn.Linear(2, 2)
    save_checkpoint(make_checkpoint(model=model, optimizers={}, step=3, config=config, method="m"),
                    run_dir / "checkpoints" / "last.pt")


def test_open_run_writes_the_config_and_holds_the_lock(tmp_path, holder):
    config = cfg(tmp_path)
    with open_run(config, "m") as run_dir:
        assert (run_dir / "config.yaml").is_file()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"), open_run(config, "m"):
            pass
    proc = holder(run_dir)
    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"), open_run(config, "m"):
        pass


@pytest.mark.parametrize("held", ["checkpoints/last.pt", "export/segmenter.pt2"])
def test_a_fresh_start_over_a_run_is_refused_and_overwrite_clears_it(tmp_path, held):
    run_dir = tmp_path / "runs" / "m" / cfg(tmp_path).dataset / "r"
    (run_dir / held).parent.mkdir(parents=True)
    (run_dir / held).write_bytes(b"x")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match=r"--resume auto, pick another name=\.\.\., or pass overwrite=true"):
        with open_run(cfg(tmp_path), "m"):
            pass
    assert (run_dir / "metrics.jsonl").is_file()
    with open_run(cfg(tmp_path, "overwrite=true"), "m"):
        pass
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "config.yaml"]  # no stale metrics to append to


def test_a_resume_with_other_settings_is_refused_listing_the_keys_and_config_yaml_is_kept(tmp_path):
    first = cfg(tmp_path, "val_every=5")
    with open_run(first, "m") as run_dir:
        write_checkpoint(first, run_dir)
    before = (run_dir / "config.yaml").read_text()
    changed = cfg(tmp_path, "resume=auto", "val_every=5", "seed=3", "features={kind: tokens, layer: -2}",
                  "crf_at_end=false")
    with pytest.raises(ResumeMismatchError) as error, open_run(changed, "m"):
        pass
    message = str(error.value)
    for key in ("seed: 0 in the checkpoint, 3 now", "features.layer: -1 in the checkpoint, -2 now", "crf_at_end"):
        assert key in message, message
    assert "\n" not in message and (run_dir / "config.yaml").read_text() == before
    # Keys that do not change the result may differ; config.yaml then records the new values.
    allowed = cfg(tmp_path, "resume=auto", "val_every=7", "log_every=3", "device=cpu", "val_batch_size=2")
    with open_run(allowed, "m"):
        pass
    assert "val_every: 7" in (run_dir / "config.yaml").read_text()


@dataclass
class Extended(RunConfig):
    new_key: int = 1


def test_a_key_the_checkpoint_lacks_is_a_difference_and_the_allowed_list_says_why():
    saved = {k: v for k, v in config_to_dict(Extended()).items() if k != "new_key"}
    assert resume_differences(saved, Extended()) == {"new_key": ("(absent)", 1)}
    assert {"max_steps", "val_every", "log_every", "device", "resume", "overwrite", "n_figure_images",
            "val_batch_size"} <= set(RESUME_MAY_DIFFER)
    assert all(len(reason) > 20 for reason in RESUME_MAY_DIFFER.values())



@dataclass
class WithLocation(RunConfig):
    pseudo_dir: str = resume_may_differ("")


def test_a_field_declared_resume_may_differ_may_change_and_another_methods_checkpoint_is_refused(tmp_path):
    first = load_config(WithLocation, None, [f"output_root={tmp_path / 'runs'}", "name=r", "pseudo_dir=/a"])
    with open_run(first, "m") as run_dir:
        write_checkpoint(first, run_dir)
    moved = load_config(WithLocation, None, [f"output_root={tmp_path / 'runs'}", "name=r", "pseudo_dir=/b",
                                             "resume=auto"])
    with open_run(moved, "m"):
        pass
    other = load_config(WithLocation, None, [f"output_root={tmp_path / 'runs'}", "name=r", "pseudo_dir=/b",
                                             f"resume={run_dir / 'checkpoints' / 'last.pt'}"])
    with pytest.raises(ResumeMismatchError, match=r"written by method 'm', not 'other'"), open_run(other, "other"):
        pass


def test_a_base_segmenter_for_a_method_that_does_not_use_one_is_refused(tmp_path):
    config = cfg(tmp_path, "base_segmenter=run:stego")
    with pytest.raises(ConfigError, match=r"base_segmenter='run:stego' was given, but m does not train on"):
        with open_run(config, "m"):
            pass
    assert not (tmp_path / "runs").exists()
    with open_run(config, "m", uses_base_segmenter=True):
        pass
