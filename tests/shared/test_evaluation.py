"""evaluate_head on synthetic cached features with known labels, with flips, CRF and two DDP ranks."""

import multiprocessing as mp
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist

import shared.crf as crf_module
from shared.crf import dense_crf
from shared.evaluation import evaluate_head, flip_averaged_logits
from shared.metrics import segmentation_scores

K, H, R = 3, 4, 8  # classes, patch grid, label resolution
PERM = [2, 0, 1, 3]  # cluster j scores class PERM[j]; cluster 3 is an extra that never wins


@dataclass
class FakeCache:
    features: np.ndarray
    labels: np.ndarray | None


def make_data(n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    patch_cls = rng.integers(0, K, size=(n, H, H))
    feats = np.eye(K, dtype=np.float16)[patch_cls].transpose(0, 3, 1, 2)  # (N, K, h, w) one-hot
    labels = patch_cls.repeat(R // H, axis=1).repeat(R // H, axis=2).astype(np.int16)
    labels[0, :2, :2] = (labels[0, :2, :2] + 1) % K  # one patch labelled differently: 4 wrong pixels
    labels[1, -1, :] = -1  # ignored row
    return FakeCache(feats, labels), patch_cls


def head_fn(x: torch.Tensor) -> dict:
    """Cluster j scores class PERM[j]; linear logits are the one-hot features themselves."""
    cluster = torch.stack([x[:, c] if c < K else torch.full_like(x[:, 0], -1.0) for c in PERM], dim=1)
    return {"code": x, "cluster_logits": 5 * cluster, "linear_logits": 5 * x}


def expected_pred(patch_cls: np.ndarray, clusters: bool) -> torch.Tensor:
    inverse = {c: j for j, c in enumerate(PERM) if c < K}
    ids = np.vectorize(inverse.get)(patch_cls) if clusters else patch_cls
    return torch.from_numpy(ids.repeat(R // H, axis=1).repeat(R // H, axis=2))


def test_scores_match_known_predictions_with_and_without_flip():
    cache, patch_cls = make_data()
    labels = torch.from_numpy(cache.labels.astype(np.int64))
    res = evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K + 1, batch_size=2)
    ref_u = segmentation_scores(expected_pred(patch_cls, True), labels, K, n_clusters=K + 1)
    ref_l = segmentation_scores(expected_pred(patch_cls, False), labels, K, matching="identity")
    assert res["unsupervised"] == ref_u and res["linear"] == ref_l
    assert res["unsupervised"]["mapping"] == [2, 0, 1, -1]
    assert res["unsupervised"]["acc"] == pytest.approx(100 * (1 - 4 / labels.ge(0).sum().item()))
    assert res["crf"] is None and res["crf_linear"] is None and res["extra_policy"] == "error"
    assert res["histograms"]["unsupervised"].shape == (K + 1, K)
    flipped = FakeCache(np.ascontiguousarray(cache.features[..., ::-1]), None)
    res_flip = evaluate_head(head_fn, cache, flipped=flipped, n_classes=K, n_clusters=K + 1, batch_size=3)
    assert res_flip["unsupervised"] == ref_u and res_flip["linear"] == ref_l


def test_flip_average_flips_back_before_averaging():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    xf = torch.full_like(x, 0.0)
    xf[..., 0] = 12.0  # the flipped view's first column is the original's last
    out = flip_averaged_logits(lambda t: {"cluster_logits": t, "linear_logits": None}, x, xf)
    expected = x.clone()
    expected[..., -1] = (x[..., -1] + 12.0) / 2
    expected[..., :-1] = x[..., :-1] / 2
    assert torch.equal(out["cluster_logits"], expected) and out["linear_logits"] is None


class CountingImages(list):
    """A dataset stand-in that counts how often each item is read (every read decodes a file in real use)."""

    def __init__(self, items):
        super().__init__(items)
        self.reads = [0] * len(items)

    def __getitem__(self, i):
        self.reads[i] += 1
        return super().__getitem__(i)


def test_crf_scores_equal_direct_crf():
    cache, _ = make_data(n=3, seed=1)
    rng = np.random.default_rng(2)
    images = CountingImages([{"image": torch.from_numpy(rng.normal(0, 1, (3, R, R))).float()} for _ in range(3)])
    res = evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K + 1, batch_size=2,
                        crf_images=images, crf_workers=1)
    assert images.reads == [1, 1, 1]  # one read per image serves both the cluster and the linear CRF
    x = torch.from_numpy(cache.features.astype(np.float32))
    out = head_fn(x)
    labels = torch.from_numpy(cache.labels.astype(np.int64))

    def crf_argmax(key: str) -> torch.Tensor:
        return torch.stack([torch.from_numpy(dense_crf(list.__getitem__(images, i)["image"], out[key][i]).argmax(0))
                            for i in range(3)])

    assert res["crf_unsupervised"] == segmentation_scores(crf_argmax("cluster_logits"), labels, K, n_clusters=K + 1)
    assert res["crf_linear"] == segmentation_scores(crf_argmax("linear_logits"), labels, K, matching="identity")
    assert res["crf"] == res["crf_unsupervised"] and res["crf_timeouts"] == 0


def _stuck_crf(bgr, probs):
    time.sleep(600)


def test_crf_timeout_falls_back_to_plain_prediction(monkeypatch):
    monkeypatch.setattr(crf_module, "crf_from_probs", _stuck_crf)  # forked CRF workers inherit the stuck CRF
    cache, _ = make_data(n=2, seed=3)
    images = [{"image": torch.zeros(3, R, R)} for _ in range(2)]
    with pytest.warns(RuntimeWarning, match="timed out"):
        res = evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K + 1, crf_images=images,
                            crf_workers=2, crf_timeout_s=0.5)
    assert res["crf_timeouts"] == 4  # 2 images x (cluster + linear logits)
    assert res["crf_unsupervised"] == res["unsupervised"] and res["crf_linear"] == res["linear"]


def test_missing_labels_and_wrong_cluster_count_are_errors():
    cache, _ = make_data(n=2)
    with pytest.raises(ValueError, match="no labels"):
        evaluate_head(head_fn, FakeCache(cache.features, None), flipped=None, n_classes=K, n_clusters=K + 1)
    with pytest.raises(ValueError, match="n_clusters=3"):
        evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K)


def _rank_main(rank: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cache, _ = make_data(n=5)
        res = evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K + 1, batch_size=2)
        queue.put((rank, res["histograms"]["unsupervised"].tolist(), res["unsupervised"]["acc"]))
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_histograms(tmp_path):
    ctx = mp.get_context("fork")  # no re-import of torch in the children: fast
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, str(tmp_path / "init"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    cache, _ = make_data(n=5)
    single = evaluate_head(head_fn, cache, flipped=None, n_classes=K, n_clusters=K + 1)
    for _, hist, acc in got:
        assert np.array_equal(np.array(hist), single["histograms"]["unsupervised"])
        assert acc == single["unsupervised"]["acc"]
