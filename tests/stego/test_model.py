"""StegoHead: independent dropout draws per branch and for the loss's feature signal; plain convolutions at eval."""

import torch
import torch.nn.functional as F

from stego.model import StegoHead


def _identity_linear_head(channels: int, nonlinear: bool) -> StegoHead:
    head = StegoHead(channels, channels, dropout=0.5, nonlinear=nonlinear)
    with torch.no_grad():
        head.linear_branch.weight.copy_(torch.eye(channels)[:, :, None, None])
        head.linear_branch.bias.zero_()
    return head


def test_signal_and_branches_draw_independent_dropout_masks():
    torch.manual_seed(0)
    feats = torch.rand(4, 16, 3, 3) + 0.5  # positive, so a dropped channel is exactly the zero channel
    head = _identity_linear_head(16, nonlinear=False).train()
    signal, code = head(feats)  # code = drop_1(f) through an identity conv, signal = drop_2(f)
    kept_signal, kept_code = signal[:, :, 0, 0] != 0, code[:, :, 0, 0] != 0
    assert not torch.equal(kept_signal, kept_code)  # same draw would give the same mask (2^-64 chance otherwise)
    torch.testing.assert_close(signal, feats * kept_signal[:, :, None, None] * 2)  # Dropout2d: whole channels, x1/(1-p)
    # The nonlinear branch reads a third mask: code - linear(drop_1(f)) is neither nonlinear(signal) nor
    # nonlinear(drop_1(f)).
    head = _identity_linear_head(16, nonlinear=True).train()
    torch.manual_seed(1)
    signal, code = head(feats)
    torch.manual_seed(1)
    first = F.dropout2d(feats, 0.5, training=True)  # the linear branch's draw comes first
    nonlinear_part = code - first
    assert not torch.allclose(nonlinear_part, head.nonlinear_branch(signal))
    assert not torch.allclose(nonlinear_part, head.nonlinear_branch(first))


def test_eval_mode_is_two_plain_convolution_branches():
    torch.manual_seed(0)
    head = StegoHead(8, 5).eval()
    feats = torch.randn(2, 8, 4, 4)
    signal, code = head(feats)
    expected = head.linear_branch(feats) + head.nonlinear_branch(feats)
    torch.testing.assert_close(signal, feats)
    torch.testing.assert_close(code, expected)
