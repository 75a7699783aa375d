"""Suite-wide fixtures. `USS_TEST_DEVICE=cuda` (set by `make gpu-check`) runs the device-parametrised tests on the
GPU; the default suite runs on the CPU."""

import os

import pytest


@pytest.fixture(scope="session")
def test_device() -> str:
    return os.environ.get("USS_TEST_DEVICE", "cpu")
