"""`make gpu-check`: everything that needs CUDA, in one command of at most 8 minutes (run it first when a GPU is
lent; its output goes into the closing note).

1. the method contract test and the segmenter tests on `cuda` (USS_TEST_DEVICE=cuda);
2. the xformers and SDPA attention paths against each other on the GPU (skipped when xformers is not installed);
3. a 1-GPU NCCL `torchrun` of the tiny STEGO config;
4. `make bench ARGS="--device cuda"` (benchmarks.run_all): the GPU-side benchmarks measured on the GPU, the
   device named in the results header.

Each step has its own time limit; the summary lists every step's exit code and time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def steps(tmp: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds)."""
    torchrun = str(Path(PY).with_name("torchrun"))
    return [
        ("contract + segmenter tests on cuda",
         [PY, "-m", "pytest", "-q", "tests/test_method_contract.py", "tests/shared/test_segmenter.py",
          "tests/dinov2_patched/test_attention.py"], 240),
        ("1-GPU NCCL torchrun of tiny STEGO", [torchrun, "--standalone", "--nproc_per_node=1", "-m", "stego.train",
                                              "--config", "stego/configs/tiny.yaml", "device=cuda",
                                              f"output_root={tmp / 'runs'}", f"cache_dir={tmp / 'cache'}"], 90),
        ("make bench", [PY, "-m", "benchmarks.run_all", "--device", "cuda", "--out", str(tmp / "bench.md")], 150),
    ]


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run it on a machine with a GPU.", file=sys.stderr)
        return 2
    print(f"gpu-check on {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    env = {**os.environ, "USS_TEST_DEVICE": "cuda", "PYTHONUNBUFFERED": "1"}
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, command, limit in steps(Path(tmp)):
            print(f"\n=== {name}", flush=True)
            started = time.perf_counter()
            try:
                code = subprocess.run(command, cwd=REPO, env=env, timeout=limit, check=False).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            summary.append((name, code, time.perf_counter() - started))
            if name == "make bench" and (Path(tmp) / "bench.md").is_file():
                print((Path(tmp) / "bench.md").read_text())
    print("\n=== summary")
    for name, code, seconds in summary:
        print(f"{name}: exit {code} in {seconds:.0f} s")
    return 0 if all(code == 0 for _, code, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
