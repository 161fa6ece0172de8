"""Tests of the deep-linear-network theory (locallearn.theory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locallearn.losses import F_KINDS
from locallearn.theory import (
    cases,
    closed_form_b,
    cosine,
    data,
    fit_b,
    format_table,
    linear_cnn,
    linear_mlp,
    plot,
    rel_error,
    run_all,
    weights,
)
from locallearn.theory.optimal_b import b_gradient_norm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _by_case(rows: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r in rows:
        out.setdefault(r["case"], {})[r["layer"]] = r
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run this module on one intra-op thread, then restore the setting.

    The problems here are small (matrices of a few hundred rows): a second thread buys little,
    and on a busy 2-core machine threads waiting for each other multiply the run time.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def views() -> tuple[torch.Tensor, torch.Tensor]:
    """256 Gaussian positive pairs of 128-vectors."""
    return data.gaussian_vectors(256, 128, _gen(1))


# --- explicit formulas against autograd --------------------------------------------------------


@pytest.mark.parametrize("kind", F_KINDS)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("context", ["same", "top"])
def test_mlp_explicit_gradients_match_autograd(kind: str, relu: bool, context: str) -> None:
    g = _gen(2)
    x, xo = data.gaussian_vectors(24, 12, g)
    ws = weights.mlp_weights([12, 10, 8, 6], g, kind="gaussian")
    top = ws[-1].shape[0]
    bs = [
        torch.randn(w.shape[0], w.shape[0] if context == "same" else top, generator=g,
                    dtype=torch.float64)
        for w in ws
    ]
    local = linear_mlp.local_grads(ws, x, xo, bs, relu=relu, context=context, kind=kind)
    ref = linear_mlp.local_grads_autograd(ws, x, xo, bs, relu=relu, context=context, kind=kind)
    bp = linear_mlp.bp_grads(ws, x, xo, bs[-1], relu=relu, kind=kind)
    bp_ref = linear_mlp.bp_grads_autograd(ws, x, xo, bs[-1], relu=relu, kind=kind)
    for a, b in zip(local + bp, ref + bp_ref):
        assert a.shape == b.shape
        assert rel_error(a, b) < 1e-9
    # stop-gradient between layers: the local update differs from BP below the top
    assert rel_error(local[0], bp[0]) > 1e-3


@pytest.mark.parametrize("pools", [[4, 2, 1], [2, 1, 1], [1, 1, 1]])
def test_cnn_explicit_gradients_match_autograd(pools: list[int]) -> None:
    g = _gen(3)
    x, xo = data.gaussian_images(6, 2, 8, g)
    ks = weights.conv_weights(2, 5, 3, g)
    zs = linear_cnn.forward(ks, x)
    assert [tuple(z.shape[2:]) for z in zs] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    torch.testing.assert_close(zs[1], F.conv2d(x, ks[0], stride=2), rtol=1e-12, atol=1e-12)
    bs = []
    for i, p in enumerate(pools):
        d = 5 * (zs[i + 1].shape[2] // p) ** 2
        bs.append(torch.randn(d, d, generator=g, dtype=torch.float64))
    local = linear_cnn.local_grads(ks, x, xo, bs, pools, kind="softplus")
    ref = linear_cnn.local_grads_autograd(ks, x, xo, bs, pools, kind="softplus")
    bp = linear_cnn.bp_grads(ks, x, xo, bs[-1], kind="softplus")
    bp_ref = linear_cnn.bp_grads_autograd(ks, x, xo, bs[-1], kind="softplus")
    for a, b in zip(local + bp, ref + bp_ref):
        assert a.shape == b.shape
        assert rel_error(a, b) < 1e-9


def test_cnn_transfer_matrix_is_the_conv_stack() -> None:
    g = _gen(4)
    ks = weights.conv_weights(3, 8, 3, g)
    x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    zs = linear_cnn.forward(ks, x)
    for layer in range(4):
        m = linear_cnn.transfer(ks, layer, 8)
        torch.testing.assert_close(zs[layer].flatten(1) @ m.t(), zs[-1].flatten(1))
        if layer >= 1:  # orthonormal rows above the first (widening) layer
            torch.testing.assert_close(m @ m.t(), torch.eye(m.shape[0], dtype=torch.float64))


def test_semi_orthogonal_shapes_and_orthonormality() -> None:
    g = _gen(5)
    wide = weights.semi_orthogonal(4, 9, g)
    tall = weights.semi_orthogonal(9, 4, g)
    torch.testing.assert_close(wide @ wide.t(), torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(tall.t() @ tall, torch.eye(4, dtype=torch.float64))
    ws = weights.mlp_weights([128, 128, 64, 32], g)
    m = linear_mlp.transfer(ws, 1)
    assert m.shape == (32, 128)
    torch.testing.assert_close(m @ m.t(), torch.eye(32, dtype=torch.float64))


# --- optimal B ---------------------------------------------------------------------------------


def test_newton_and_lbfgs_reach_the_same_optimum() -> None:
    x, xo = data.gaussian_vectors(64, 10, _gen(6))
    for kind in ("softplus", "softplus-diff", "linear"):
        b_newton = fit_b(x, xo, kind=kind, method="newton")
        b_lbfgs = fit_b(x, xo, kind=kind, method="lbfgs")
        assert b_gradient_norm(x, xo, b_newton, kind=kind) < 1e-9
        assert rel_error(b_lbfgs, b_newton) < 1e-5
        assert b_newton.norm() > 0.1


def test_closed_form_b_is_the_local_optimum(views: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, xo = views
    ws = weights.mlp_weights([128] * 4, _gen(7))
    zs, zo = linear_mlp.forward(ws, x), linear_mlp.forward(ws, xo)
    b_top = fit_b(zs[-1], zo[-1])
    for layer in (1, 2):
        b = closed_form_b(linear_mlp.transfer(ws, layer), b_top)
        # stationary for the local problem, and different from B_L itself
        assert b_gradient_norm(zs[layer], zo[layer], b) < 1e-8
        assert b_gradient_norm(zs[layer], zo[layer], b_top) > 1e-3


# --- the statements ----------------------------------------------------------------------------


def test_exactness_orthonormal_optimal_b(views: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, xo = views  # 6 layers x 128 units
    rows = _by_case(cases.exactness(x, xo, lbfgs=False))
    assert "exact-lbfgs" not in rows
    for case in ("exact", "forward-forward"):
        assert sorted(rows[case]) == [1, 2, 3, 4, 5, 6]
        for r in rows[case].values():
            assert r["cosine"] > 0.9999 and r["rel_error"] < 1e-6, (case, r)


def test_lbfgs_fitted_b_approaches_exactness() -> None:
    x, xo = data.gaussian_vectors(128, 32, _gen(12))
    rows = _by_case(cases.exactness(x, xo, lbfgs=True, depth=4))
    assert sorted(rows["exact-lbfgs"]) == [1, 2, 3, 4]
    for r in rows["exact-lbfgs"].values():  # optimisation reaches the closed form
        assert r["cosine"] > 0.9999 and r["rel_error"] < 1e-4, r


def test_broken_cases_fall_towards_the_input(views: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, xo = views
    rows = _by_case(
        cases.random_b(x, xo) + cases.non_orthogonal(x, xo) + cases.relu(x, xo)
    )
    for case in ("random-B", "non-orthogonal", "relu"):
        per = rows[case]
        assert per[6]["cosine"] > 0.9999  # the top layer's local loss is the BP loss
        assert per[1]["cosine"] < 0.9, (case, per[1])
        assert max(per[la]["cosine"] for la in range(1, 6)) < 0.99, case
    cos = [rows["non-orthogonal"][la]["cosine"] for la in range(1, 7)]
    assert all(a < b for a, b in zip(cos, cos[1:])), cos
    relu_cos = [rows["relu"][la]["cosine"] for la in range(1, 7)]
    assert relu_cos[0] < relu_cos[3] < relu_cos[5], relu_cos


def test_direct_feedback_closer_than_same_layer_context() -> None:
    x, xo = data.gaussian_vectors(512, 32, _gen(8))  # smaller than the default 128-64-...-4
    rows = _by_case(cases.direct_feedback(x, xo, widths=(32, 16, 8, 4)))
    same, top = rows["shrinking-same"], rows["shrinking-top"]
    for layer in range(1, 4):
        assert top[layer]["cosine"] > same[layer]["cosine"], layer
        assert top[layer]["rel_error"] < same[layer]["rel_error"], layer
        assert top[layer]["cosine"] < 0.99  # closer, not exact
    assert top[4]["cosine"] > 0.9999 and same[4]["cosine"] > 0.9999


def test_spatial_dependence_pool_1_exact_global_not() -> None:
    x, xo = data.gaussian_images(96, 3, 16, _gen(9))
    rows = _by_case(cases.spatial_dependence(x, xo))
    for r in rows["conv-pool-1"].values():
        assert r["cosine"] > 0.9999 and r["rel_error"] < 1e-6, r
    glob = rows["conv-global-pool"]
    for layer in (1, 2, 3):
        assert glob[layer]["cosine"] < 0.99, glob[layer]
        assert glob[layer]["rel_error"] > rows["conv-pool-1"][layer]["rel_error"]
    assert rows["conv-pool-2111"][1]["cosine"] < 0.99
    assert rows["conv-pool-2111"][2]["cosine"] > 0.9999


# --- run_all, report, errors -------------------------------------------------------------------

EXPECTED_CASES = {
    "exact", "forward-forward", "random-B", "non-orthogonal", "relu", "shrinking-same",
    "shrinking-top", "conv-global-pool", "conv-pool-1", "conv-pool-2111",
}


def test_run_all_on_images_has_every_case(tmp_path) -> None:
    g = _gen(10)
    images = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    rows = run_all(
        images, seed=3, n_samples=32, n_shrinking=32, n_maps=16, lbfgs=False, threads=2
    )
    assert torch.get_num_threads() == 1  # restored (the module runs on one thread)
    assert all(set(r) == {"case", "layer", "cosine", "rel_error"} for r in rows)
    by = _by_case(rows)
    assert set(by) == EXPECTED_CASES
    for case, per in by.items():
        assert sorted(per) == list(range(1, 5 if case.startswith("conv") else 7)), case
        for r in per.values():
            assert -1.0 - 1e-9 <= r["cosine"] <= 1.0 + 1e-9 and r["rel_error"] >= 0.0
    for r in by["exact"].values():  # exactness does not depend on the data
        assert r["cosine"] > 0.9999
    table = format_table(rows)
    assert "conv-pool-1" in table and "layer 6" in table
    assert len(table.splitlines()) == 3 + len(EXPECTED_CASES)
    assert "e-" in format_table(rows, "rel_error")
    out = plot(rows, tmp_path / "theory.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_reproducible_from_the_seed() -> None:
    a = cases.exactness(*data.gaussian_vectors(32, 16, _gen(11)), lbfgs=False, seed=4)
    b = cases.exactness(*data.gaussian_vectors(32, 16, _gen(11)), lbfgs=False, seed=4)
    assert a == b


def test_metrics() -> None:
    a = torch.tensor([1.0, 0.0])
    assert cosine(a, torch.tensor([0.0, 2.0])) == 0.0
    assert cosine(a, 3 * a) == pytest.approx(1.0)
    assert rel_error(torch.tensor([1.0, 1.0]), a) == pytest.approx(1.0)


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="images"):
        run_all(torch.rand(4, 32, 32))
    with pytest.raises(ValueError, match="threads"):
        run_all(threads=0)
    with pytest.raises(ValueError, match="at least 16x16"):
        run_all(torch.rand(4, 3, 8, 8))
    with pytest.raises(ValueError, match="reg"):
        fit_b(torch.randn(4, 3), torch.randn(4, 3), reg=0.0)
    with pytest.raises(ValueError, match="context"):
        closed_form_b(torch.eye(3), torch.eye(3), context="left")
    with pytest.raises(ValueError, match="unknown"):
        format_table([{"case": "x", "layer": 1, "cosine": 1.0, "rel_error": 0.0}], "norm")
    with pytest.raises(ValueError, match="shapes differ"):
        cosine(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="pool size"):
        linear_cnn.pool(torch.zeros(1, 1, 4, 4), 3)
