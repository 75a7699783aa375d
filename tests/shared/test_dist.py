"""shared.dist: the one-process group that plain ``python`` gets, and no-op helpers without a group.

The multi-process path (torchrun, 2 gloo ranks) is exercised end to end in test_training_plumbing.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shared import dist as sdist
from shared.dist import DistContext, all_reduce_sum, distributed, resolve_device


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


def test_plain_python_gets_a_one_process_gloo_group():
    with distributed("cpu") as ctx:
        assert ctx == DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
        assert dist.is_initialized() and dist.get_backend() == "gloo" and dist.get_world_size() == 1
        t = torch.tensor([1.0, 2.0])
        dist.all_reduce(t)  # a real collective works in the 1-process group
        assert torch.equal(t, torch.tensor([1.0, 2.0]))
        # DDP can wrap a model in the same code path as under torchrun.
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
        model(torch.ones(3, 2)).sum().backward()
    assert not dist.is_initialized()


def test_group_is_destroyed_when_the_body_raises():
    with pytest.raises(ValueError, match="boom"), distributed("cpu"):
        raise ValueError("boom")
    assert not dist.is_initialized()


def test_existing_group_is_reused_and_left_alone():
    with distributed("cpu"):
        with distributed("cpu") as inner:
            assert inner.world_size == 1
        assert dist.is_initialized()  # the inner context did not own the group
    assert not dist.is_initialized()


def test_helpers_are_noops_without_a_group():
    t = torch.tensor([3.0, 4.0])
    assert all_reduce_sum(t) is t and torch.equal(t, torch.tensor([3.0, 4.0]))
    assert torch.equal(sdist.all_reduce_mean(t.clone()), t)
    assert torch.equal(sdist.all_reduce_max(t.clone()), t)
    sdist.barrier()
    obj = {"a": [1, 2]}
    assert sdist.broadcast_object(obj) is obj
    assert sdist.get_rank() == 0 and sdist.get_world_size() == 1 and sdist.is_main_process()
    with pytest.raises(TypeError, match="floating-point"):
        sdist.all_reduce_mean(torch.tensor([1, 2]))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected_auto
    with pytest.raises(ValueError, match="Unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_torchrun_env_without_world_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE is not"), distributed("cpu"):
        pass
    assert not dist.is_initialized()


def test_torchrun_job_refuses_one_explicit_gpu_for_every_rank(monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="device='cuda:0' names one GPU, but all 2 ranks"), distributed("cuda:0"):
        pass
    assert not dist.is_initialized()
