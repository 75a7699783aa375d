"""SegUnify modules: batch norm makes the compressor deterministic in eval mode, the EMA arithmetic of the global
centres, where the centres start, and the evaluation head."""

import pytest
import torch
import torch.nn.functional as F

from segunify.model import Compressor, Labeler, SegUnifyEvalHead


def _warmed_compressor(nonlinear: bool = True) -> Compressor:
    """A compressor whose batch norms hold non-trivial running statistics and affine parameters."""
    torch.manual_seed(0)
    compressor = Compressor(6, 4, nonlinear=nonlinear).train()
    for _ in range(5):
        compressor(torch.randn(3, 6, 4, 4) * 2 + 1)
    with torch.no_grad():
        for module in compressor.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return compressor.eval()


def _branch64(block: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SiLU(BN(Conv1x1(x))) in float64 from the block's weights and running statistics, by the formula."""
    conv, bn = block[0], block[1]
    y = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0].double(), x)
    y = (y - bn.running_mean.double()[:, None, None]) / torch.sqrt(bn.running_var.double()[:, None, None] + bn.eps)
    y = y * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    return y * torch.sigmoid(y)


def test_eval_mode_compressor_is_the_formula_and_independent_of_the_batch():
    compressor = _warmed_compressor()
    x = torch.randn(4, 6, 3, 5)
    with torch.no_grad():
        together = compressor(x)
        alone = torch.cat([compressor(x[i:i + 1]) for i in range(4)])
        again = compressor(x)
    x64 = x.double()
    nonlinear = compressor.nonlinear_branch
    expected = _branch64(compressor.linear_branch, x64) + _branch64(nonlinear[1], _branch64(nonlinear[0], x64))
    torch.testing.assert_close(together.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, together)


def test_training_mode_uses_batch_statistics():
    # The counterpart: in training mode an image's code depends on the other images of its batch.
    compressor = _warmed_compressor().train()
    x = torch.randn(4, 6, 3, 5)
    with torch.no_grad():
        together = compressor(x)[:1]
        with_others = compressor(torch.cat([x[:1], torch.randn(3, 6, 3, 5) * 3]))[:1]
    assert not torch.allclose(together, with_others, atol=1e-3)


def test_linear_only_compressor_is_one_branch():
    compressor = _warmed_compressor(nonlinear=False)
    x = torch.randn(2, 6, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(compressor(x).double(), _branch64(compressor.linear_branch, x.double()),
                                   rtol=1e-5, atol=1e-5)


def test_ema_update_follows_the_closed_form():
    torch.manual_seed(0)
    labeler = Labeler(5, 3, n_sets=2, ema=0.9)
    g0 = labeler.global_centres.clone().double()
    target = labeler.local.detach().mean(0).double()
    for _ in range(7):
        labeler.update_global()
    # Fixed local centres: G_n = a^n G_0 + (1 - a^n) mean(local)
    expected = 0.9 ** 7 * g0 + (1 - 0.9 ** 7) * target
    torch.testing.assert_close(labeler.global_centres.double(), expected, rtol=1e-5, atol=1e-6)


def test_ema_update_tracks_moving_local_centres_step_by_step():
    torch.manual_seed(1)
    labeler = Labeler(4, 2, n_sets=1, ema=0.99)
    reference = labeler.global_centres.clone().double()
    for _ in range(20):
        with torch.no_grad():
            labeler.local.add_(torch.randn_like(labeler.local))  # the local centres move
        reference = 0.99 * reference + 0.01 * labeler.local.detach()[0].double()
        labeler.update_global()
    torch.testing.assert_close(labeler.global_centres.double(), reference, rtol=1e-5, atol=1e-6)
    assert not labeler.global_centres.requires_grad
    assert [name for name, _ in labeler.named_parameters()] == ["local"]  # the global centres get no gradient


def test_global_centres_start_at_the_local_ones_and_bad_ema_is_refused():
    labeler = Labeler(8, 5, n_sets=3)
    torch.testing.assert_close(labeler.global_centres, labeler.local.detach().mean(0))
    with pytest.raises(ValueError, match="ema=1.0"):
        Labeler(8, 5, ema=1.0)


def test_start_at_sets_directions_and_keeps_lengths():
    torch.manual_seed(2)
    labeler = Labeler(6, 4, n_sets=2)
    lengths = labeler.local.detach().norm(dim=-1)
    directions = torch.randn(4, 6)
    labeler.start_at(directions)
    torch.testing.assert_close(labeler.local.detach().norm(dim=-1), lengths)
    for centres in labeler.local.detach():
        torch.testing.assert_close(F.normalize(centres, dim=1), F.normalize(directions, dim=1))
    torch.testing.assert_close(labeler.global_centres, labeler.local.detach().mean(0))


def test_eval_head_scores_the_global_centres():
    compressor = _warmed_compressor()
    labeler = Labeler(4, 3, ema=0.5)
    with torch.no_grad():
        labeler.local.add_(1.0)
    labeler.update_global()  # global != local, so the test tells which set the head reads
    head = SegUnifyEvalHead(compressor, labeler, None, alpha=2.0).eval()
    x = torch.randn(2, 6, 5, 7)
    with torch.no_grad():
        out = head(x)
        code = compressor(x)
    cosines = torch.einsum("bdhw,kd->bkhw", F.normalize(code.double(), dim=1),
                           F.normalize(labeler.global_centres.double(), dim=1))
    torch.testing.assert_close(out["cluster_logits"].double(), 2.0 * cosines, rtol=1e-5, atol=1e-5)
    assert set(out) == {"code", "cluster_logits"}  # the export itself is checked by the end-to-end test
