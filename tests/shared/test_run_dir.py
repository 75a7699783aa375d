"""Run directories and base segmenters: fresh starts never train over another run, and a base segmenter is found
by path, run directory or `run:<method>`, and refused when it was trained on other features."""

from types import SimpleNamespace

import pytest
import torch
from test_segmenter import C, ToyHead, example, metadata

from shared.run_dir import RunDirError, check_base_compatible, check_fresh_start, resolve_base_segmenter
from shared.segmenter import save


def test_a_fresh_start_over_checkpoints_needs_resume_or_overwrite(tmp_path):
    check_fresh_start(tmp_path, "", False)  # nothing there yet
    (tmp_path / "checkpoints").mkdir()
    torch.save({}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(RunDirError, match=r"already holds a run .* --resume auto, pick another name=\.\.\., or pass "
                                          r"overwrite=true"):
        check_fresh_start(tmp_path, "", False)
    check_fresh_start(tmp_path, "auto", False)
    check_fresh_start(tmp_path, "", True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    path = root / "stego" / "camvid_sample" / "demo" / "export" / "segmenter.pt2"
    save(path, ToyHead(), example(), metadata())
    return root, path


def test_base_segmenter_by_path_run_directory_and_run_name(base):
    root, path = base
    assert resolve_base_segmenter("", output_root=str(root), dataset="camvid_sample", name="demo") is None
    assert resolve_base_segmenter(str(path), output_root="x", dataset="y", name="z") == path
    assert resolve_base_segmenter(str(path.parent.parent), output_root="x", dataset="y", name="z") == path
    assert resolve_base_segmenter("run:stego", output_root=str(root), dataset="camvid_sample", name="demo") == path
    assert resolve_base_segmenter("run:stego/demo", output_root=str(root), dataset="camvid_sample",
                                  name="other") == path
    with pytest.raises(RunDirError, match=r"base_segmenter='run:stego': no exported segmenter at .*other.*; train "
                                          r"stego first \(name=other"):
        resolve_base_segmenter("run:stego", output_root=str(root), dataset="camvid_sample", name="other")
    with pytest.raises(RunDirError, match="no exported segmenter at .*missing.pt2; pass the export"):
        resolve_base_segmenter(str(root / "missing.pt2"), output_root="x", dataset="y", name="z")


def backbone(**changes) -> SimpleNamespace:
    values = {"name": "dinov2_vits14", "weights_id": "random", "descriptor": {"kind": "tokens", "layer": -1},
              "feature_dim": C}
    values.update(changes)
    return SimpleNamespace(**values)


def test_base_segmenter_must_share_backbone_weights_and_features(base):
    _, path = base
    assert check_base_compatible(path, backbone(), n_classes=4)["n_clusters"] == 5
    for changes in ({"name": "dinov2_vitb14"}, {"weights_id": "official"},
                    {"descriptor": {"kind": "keys", "blocks": [-1]}}):
        with pytest.raises(RunDirError, match="was trained on dinov2_vits14 weights random with features"):
            check_base_compatible(path, backbone(**changes))
    with pytest.raises(RunDirError, match="has 5 clusters, fewer than the 6 classes"):
        check_base_compatible(path, backbone(), n_classes=6)
    bad = path.parent / "not_a_program.pt2"
    bad.write_bytes(b"junk")
    with pytest.raises(RunDirError, match="base_segmenter: .*not_a_program.pt2 is not an exported program"):
        check_base_compatible(bad, backbone())
