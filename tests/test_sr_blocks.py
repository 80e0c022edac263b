"""Polarized self-attention and dynamic convolution: shapes, hand-checked cases, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsight.models.blocks import DynamicConv2d, PolarizedSelfAttention


def _zero(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def test_psa_shape_and_zero_weights_are_identity():
    psa = PolarizedSelfAttention(8)
    x = torch.randn(2, 8, 5, 7)
    assert psa(x).shape == x.shape
    _zero(psa)  # LayerNorm of a zero vector is its bias 0: both gates sigmoid(0) = 0.5, 0.5x + 0.5x = x
    torch.testing.assert_close(psa(x), x)


def test_psa_hand_case():
    # spatial branch: q has one channel, softmax over one channel = 1; v picks input channel 0
    # -> a_sp = sigmoid(x_0) per pixel. Channel branch: all zero except the LayerNorm bias beta
    # -> a_ch = sigmoid(beta). Output = x * sigmoid(beta_c) + x * sigmoid(x_0).
    psa = PolarizedSelfAttention(2)
    _zero(psa)
    beta = torch.tensor([1.0, -2.0])
    with torch.no_grad():
        psa.ch_norm.bias.copy_(beta)
        psa.sp_v.weight[0, 0, 0, 0] = 1.0
    x = torch.randn(1, 2, 3, 4)
    expected = x * torch.sigmoid(beta)[None, :, None, None] + x * torch.sigmoid(x[:, :1])
    torch.testing.assert_close(psa(x), expected)


def test_psa_matches_the_paper_formulas_in_numpy():
    torch.manual_seed(0)
    psa = PolarizedSelfAttention(4)
    x = torch.randn(1, 4, 3, 3)
    xn = x[0].numpy().reshape(4, 9).astype(np.float64)

    def conv1(m):
        bias = 0.0 if m.bias is None else m.bias.detach().numpy()[:, None]
        return m.weight.detach().numpy()[:, :, 0, 0] @ xn + bias

    def softmax(a):
        e = np.exp(a - a.max())
        return e / e.sum()

    q = softmax(conv1(psa.ch_q)[0])  # over the 9 pixels
    z = conv1(psa.ch_v) @ q  # (2,)
    z = psa.ch_z.weight.detach().numpy()[:, :, 0, 0] @ z + psa.ch_z.bias.detach().numpy()
    z = (z - z.mean()) / np.sqrt(z.var() + psa.ch_norm.eps)
    a_ch = 1 / (1 + np.exp(-z))  # LN weight 1, bias 0 at initialisation
    qs = softmax(conv1(psa.sp_q).mean(axis=1))  # over the 2 channels
    a_sp = 1 / (1 + np.exp(-(qs @ conv1(psa.sp_v))))
    expected = xn * a_ch[:, None] + xn * a_sp[None, :]
    np.testing.assert_allclose(psa(x)[0].detach().numpy().reshape(4, 9), expected, rtol=1e-5, atol=1e-6)


def test_dynamic_conv_k1_is_an_ordinary_conv():
    dyn = DynamicConv2d(3, 5, kernel_size=3, kernels=1)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(dyn.weight[0])
        conv.bias.copy_(dyn.bias[0])
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(dyn(x), conv(x))


def test_dynamic_conv_forced_attention_per_sample():
    dyn = DynamicConv2d(3, 4, kernels=3)
    x = torch.randn(2, 3, 7, 7)
    pi = torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.0, 0.75]])  # one-hot for sample 0, a mix for sample 1
    y = dyn(x, attention=pi)
    w, b = dyn.weight.detach(), dyn.bias.detach()
    torch.testing.assert_close(y[:1], F.conv2d(x[:1], w[1], b[1], padding=1))
    mixed_w, mixed_b = 0.25 * w[0] + 0.75 * w[2], 0.25 * b[0] + 0.75 * b[2]
    torch.testing.assert_close(y[1:], F.conv2d(x[1:], mixed_w, mixed_b, padding=1))


def test_dynamic_conv_attention_sums_to_one_and_depends_on_input():
    dyn = DynamicConv2d(4, 4, kernels=4, temperature=1.0)
    a = dyn.attention(torch.randn(3, 4, 5, 5) * torch.tensor([1.0, 5.0, -5.0])[:, None, None, None])
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3))
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize(
    "make", [lambda: PolarizedSelfAttention(6), lambda: DynamicConv2d(6, 6, kernels=2, temperature=1.0)]
)
def test_gradients_reach_every_parameter(make):
    # Seeded here, not by test order: for some draws all four ReLUs of the dynamic conv's
    # attention MLP are off on random zero-mean input, and its first layer rightly gets no gradient.
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 6, 6, 6, requires_grad=True)
    module(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dynamic_conv_refuses_even_kernels():
    with pytest.raises(ValueError, match="odd kernel_size"):
        DynamicConv2d(2, 2, kernel_size=4)


def test_a_checkpoint_with_the_old_inert_query_bias_still_loads_and_gives_the_same_output():
    psa = PolarizedSelfAttention(4)
    with torch.no_grad():
        psa.ch_norm.bias.uniform_(-1, 1)  # gates away from 0.5, so the output depends on the query
    old = {**psa.state_dict(), "ch_q.bias": torch.tensor([3.0])}
    loaded = PolarizedSelfAttention(4)
    loaded.load_state_dict(old)  # strict: any other unexpected key still fails
    x = torch.randn(2, 4, 5, 5)
    # what the old layer computed, by hand: the query with its bias, softmax over the 25 pixels
    q_old = torch.softmax((F.conv2d(x, psa.ch_q.weight) + 3.0).flatten(2), dim=2)
    q_new = torch.softmax(F.conv2d(x, psa.ch_q.weight).flatten(2), dim=2)
    torch.testing.assert_close(q_old, q_new)
    torch.testing.assert_close(loaded(x), psa(x))
    with pytest.raises(RuntimeError, match="Unexpected"):
        PolarizedSelfAttention(4).load_state_dict({**old, "ch_v.extra": torch.zeros(1)})
