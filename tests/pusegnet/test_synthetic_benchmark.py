"""The synthetic benchmark of the issue's "numbers to reach" (see synthetic.py for the data).

Targets: PU-SegNet's ECE at least 30% below the base's cluster-softmax ECE at equal or higher mIoU, below the
deterministic ablation's (sngp=false), and an error-detection AUROC of the variance of at least 0.75.
"""

import pytest
from synthetic import bench_config, evaluate, evaluate_base, make_benchmark, train


def test_fast_variant_beats_the_base_and_detects_errors():
    train_split, val_split = make_benchmark(seed=0, n_train=24, n_val=12)
    base = evaluate_base(val_split)
    ours = evaluate(train(bench_config(max_steps=100, gp_lengthscale=4.0), train_split), val_split)
    assert ours["ece"] <= 0.7 * base["ece"]
    assert ours["miou"] >= base["miou"]
    assert ours["auroc"] >= 0.75


@pytest.fixture(scope="module")
def full():
    import dataclasses

    train_split, val_split = make_benchmark(seed=0)
    cfg = bench_config(max_steps=200, gp_lengthscale=4.0)
    return {"base": evaluate_base(val_split), "pusegnet": evaluate(train(cfg, train_split), val_split),
            "deterministic": evaluate(train(dataclasses.replace(cfg, sngp=False), train_split), val_split)}


@pytest.mark.slow
def test_full_benchmark_against_the_base(full):
    assert full["pusegnet"]["ece"] <= 0.7 * full["base"]["ece"]
    assert full["pusegnet"]["miou"] >= full["base"]["miou"]
    assert full["pusegnet"]["auroc"] >= 0.75


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="not reached: both heads are under-confident against the truth and the "
                   "mean-field scaling can only lower confidence, so the SNGP head's ECE is 0.009-0.019 above the "
                   "ablation's on seeds 0-4; see pusegnet/README.md")
def test_full_benchmark_against_the_deterministic_ablation(full):
    assert full["pusegnet"]["ece"] < full["deterministic"]["ece"]
