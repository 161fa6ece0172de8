"""locallearn.losses against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from locallearn import losses

LN2 = math.log(2.0)
LN1E = math.log(1.0 + math.e)  # softplus(1)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "kind, x, value, slope",
    [
        ("hinge", t(-1.0, 0.5, 1.0, 2.0), t(2.0, 0.5, 0.0, 0.0), t(-1.0, -1.0, 0.0, 0.0)),
        ("softplus", t(1.0, 0.0), t(LN2, LN1E), t(-0.5, -1 / (1 + math.exp(-1)))),
        ("linear", t(-2.0, 3.0), t(2.0, -3.0), t(-1.0, -1.0)),
    ],
)
def test_f_and_its_derivative(kind, x, value, slope):
    assert torch.allclose(losses.f_value(x, kind), value, atol=1e-12)
    assert torch.allclose(losses.f_prime(x, kind), slope, atol=1e-12)


def test_score_loss_by_hand():
    u_pos, u_neg = t(2.0, 0.5), t(-3.0, 0.25)
    # hinge: f(u_pos) = [0, 0.5], f(-u_neg) = f([3, -0.25]) = [0, 1.25]
    assert losses.score_loss(u_pos, u_neg, "hinge").item() == pytest.approx(1.75)
    g_pos, g_neg = losses.score_loss_grads(u_pos, u_neg, "hinge")
    assert g_pos.tolist() == [0.0, -1.0] and g_neg.tolist() == [0.0, 1.0]
    # linear: -u_pos + u_neg summed = -2.5 + (-2.75)
    assert losses.score_loss(u_pos, u_neg, "linear").item() == pytest.approx(-5.25)
    # softplus-diff: softplus(u_neg - u_pos) = log(1 + e^-5) + log(1 + e^-0.25)
    expect = math.log1p(math.exp(-5.0)) + math.log1p(math.exp(-0.25))
    assert losses.score_loss(u_pos, u_neg, "softplus-diff").item() == pytest.approx(expect)
    g_pos, g_neg = losses.score_loss_grads(t(1.0), t(1.0), "softplus-diff")
    assert g_pos.item() == pytest.approx(-0.5) and g_neg.item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", losses.F_KINDS)
def test_score_loss_grads_are_the_derivatives(kind):
    u_pos = t(-0.7, 0.2, 1.6).requires_grad_()
    u_neg = t(0.4, -1.3, 0.9).requires_grad_()
    gp, gn = torch.autograd.grad(losses.score_loss(u_pos, u_neg, kind), [u_pos, u_neg])
    want_p, want_n = losses.score_loss_grads(u_pos.detach(), u_neg.detach(), kind)
    assert torch.allclose(gp, want_p) and torch.allclose(gn, want_n)


def test_info_nce_by_hand_and_as_a_direct_log_softmax():
    eye = t(1.0, 0.0, 0.0, 1.0).reshape(2, 2)
    # cosines 1 on the diagonal, 0 off it, temperature 1: -log(e / (e + 1)) = log(1 + e^-1)
    assert losses.info_nce(eye, 3 * eye, 1.0).item() == pytest.approx(math.log1p(math.exp(-1)))
    swapped = eye.flip(0)  # every positive has cosine 0, every negative 1
    assert losses.info_nce(eye, swapped, 1.0).item() == pytest.approx(LN1E)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    cos = torch.tensor([[float(a[i] @ b[j] / (a[i].norm() * b[j].norm())) for j in range(5)]
                        for i in range(5)]) / 0.1
    rows = (cos.diag() - torch.logsumexp(cos, 1)).mean()
    cols = (cos.diag() - torch.logsumexp(cos, 0)).mean()
    assert losses.info_nce(a, b, 0.1).item() == pytest.approx(-0.5 * float(rows + cols), rel=1e-5)


def test_info_nce_keeps_fp32_similarities_under_bf16_autocast():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 64, generator=g)
    b = a + 0.05 * torch.randn(16, 64, generator=g)  # positives with cosines near 1
    target = torch.arange(16)

    def plain(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).t() / 0.1
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))

    exact = losses.info_nce(a, b, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = losses.info_nce(a, b, 0.1)
        rounded = plain(a, b)  # the matmul in bf16
    assert exact.item() == pytest.approx(plain(a, b).item(), rel=1e-6)
    assert mixed.item() == pytest.approx(exact.item(), rel=1e-6)
    assert abs(rounded.item() - exact.item()) > 1e-4 * exact.item()


def test_vicreg_terms_by_hand():
    z = t(0.0, 0.0, 2.0, 2.0).reshape(2, 2)
    # no invariance error; each dimension's std sqrt(2 + 1e-4) > 1; covariance 2 off the
    # diagonal: (2^2 + 2^2) / D = 4 per view
    assert losses.vicreg(z, z.clone()).item() == pytest.approx(8.0)
    z1 = t(0.0, 0.0, 1.0, 0.0).reshape(2, 2)
    z2 = z1 + t(1.0, 0.0, 1.0, 0.0).reshape(2, 2)
    # invariance: mean of (1, 0, 1, 0)^2 = 0.5; variance per view: the mean over dimensions of
    # relu(1 - sqrt(var + 1e-4)) with variances 0.5 and 0; covariance 0
    var = ((1 - math.sqrt(0.5 + 1e-4)) + (1 - math.sqrt(1e-4))) / 2
    assert losses.vicreg(z1, z2).item() == pytest.approx(25 * 0.5 + 25 * 2 * var)


def test_ff_goodness_by_hand():
    # goodness 1 and 2 against the threshold 1: softplus(0) + softplus(1)
    value = losses.ff_goodness_loss(t(1.0, 1.0)[None], t(0.0, 2.0)[None])
    assert value.item() == pytest.approx(LN2 + LN1E)


def test_unknown_kind_is_a_one_line_error():
    with pytest.raises(ValueError, match="loss f='square' is unknown; valid: hinge"):
        losses.score_loss(t(1.0), t(1.0), "square")
