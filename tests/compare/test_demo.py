"""compare.demo end to end: random weights, tiny sizes (--fast); the full-size demo is a slow test."""

import json
from pathlib import Path

import pytest

from compare import demo


def _check_output(output, out_dir):
    methods = demo.METHODS
    assert len(output.results) == len(methods)
    assert [r.status for r in output.results] == ["ok"] * len(methods), [r.error for r in output.results]
    report = (out_dir / "compare" / "report.md").read_text()
    assert "UNTRAINED BACKBONE" in report  # random weights: every number is labelled as such
    assert (out_dir / "compare" / "comparison.png").is_file()
    data = json.loads((out_dir / "compare" / "results.json").read_text())
    assert data["header"]["dataset"] == "camvid_sample" and data["header"]["backbones"][0]["pretrained"] is False
    for result in data["results"]:
        # The trainer scored its reloaded export through the same code path: the numbers agree exactly.
        final = json.loads((Path(result["path"]) / "final_metrics.json").read_text())
        assert result["unsupervised"]["miou"] == final["unsupervised/miou"], result["method"]
        assert result["crf"] is not None and result["linear"] is not None


def test_fast_demo_runs_end_to_end_and_reuses_finished_runs(tmp_path, capsys):
    cache = str(tmp_path / "cache")
    output = demo.run_demo(tmp_path / "demo", weights="none", fast=True, cache_dir=cache)
    _check_output(output, tmp_path / "demo")
    printed = capsys.readouterr().out
    assert "report:" in printed and "| method |" in printed
    # The demo caches the validation features of every descriptor its methods read before training, and the
    # trainers the training splits the probe reads: the comparison builds no cache of its own.
    assert "feature cache" not in printed.split("[demo] comparing", 1)[1]
    from shared.features import descriptor_id

    read = {descriptor_id(r.features) for r in output.results}
    assert read == {descriptor_id(d) for d in demo.demo_descriptors(demo.METHODS, fast=True)} and len(read) == 2
    assert any((tmp_path / "nns").iterdir())  # STEGO's kNN file sits beside the feature cache, not in the repository
    # A second run trains nothing: every finished run (same backbone weights) is reused.
    weights_id = output.header["backbones"][0]["weights_id"]
    runs = demo.train_methods(tmp_path / "demo", "none", weights_id, cache, fast=True, resolution=56)
    printed = capsys.readouterr().out
    assert printed.count("reusing") == len(demo.METHODS) and "training ->" not in printed
    assert runs == [r.path for r in output.results]
    # Runs over other weights, or trained with another recipe (flags or config file contents), are not reused.
    kmeans_run = tmp_path / "demo" / "runs" / "kmeans" / "camvid_sample" / "demo_fast"
    recipe = json.loads((kmeans_run / demo.RECIPE_FILE).read_text())
    assert demo.finished(kmeans_run, weights_id, recipe)
    assert not demo.finished(kmeans_run, "other", recipe)
    assert not demo.finished(kmeans_run, weights_id, {**recipe, "argv": [*recipe["argv"], "n_init=2"]})
    stego_recipe = json.loads((tmp_path / "demo" / "runs" / "stego" / "camvid_sample" / "demo_fast" /
                               demo.RECIPE_FILE).read_text())
    assert list(stego_recipe["config_files"]) == ["stego/configs/tiny.yaml"]  # an edited config retrains


@pytest.mark.slow
def test_full_demo_with_random_weights(tmp_path):
    output = demo.run_demo(tmp_path / "demo", weights="none", fast=False, cache_dir=str(tmp_path / "cache"))
    _check_output(output, tmp_path / "demo")
