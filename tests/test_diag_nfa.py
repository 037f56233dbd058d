"""NFA maths: correlations, NFM/AGOP, matrix powers, decomposition (no models involved)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diagnostics import (
    agop,
    c_nfa,
    kernel_alignment,
    matrix_correlation,
    nfa_correlation,
    nfa_decomposition,
    nfm,
    psd_power,
    relative_change,
    uc_nfa,
)

matrices = st.integers(0, 2**31 - 1).map(
    lambda seed: torch.randn(4, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
)


@settings(max_examples=40, deadline=None)
@given(matrices, matrices, st.floats(0.01, 100), st.sampled_from(["pearson", "cosine"]))
def test_correlation_properties(A: torch.Tensor, B: torch.Tensor, scale: float, method: str) -> None:
    r = matrix_correlation(A, B, method)
    assert r.dim() == 0
    assert -1 - 1e-12 <= float(r) <= 1 + 1e-12
    assert math.isclose(float(r), float(matrix_correlation(B, A, method)), abs_tol=1e-12)
    assert math.isclose(float(r), float(matrix_correlation(scale * A, B, method)), abs_tol=1e-10)
    assert math.isclose(float(matrix_correlation(A, A, method)), 1.0, abs_tol=1e-12)
    assert math.isclose(float(matrix_correlation(A, -A, method)), -1.0, abs_tol=1e-12)


def test_pearson_vs_cosine_definitions() -> None:
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    B = torch.tensor([[2.0, 1.0], [5.0, 3.0]], dtype=torch.float64)
    cos = (A * B).sum() / (A.norm() * B.norm())
    a, b = A - A.mean(), B - B.mean()
    pear = (a * b).sum() / (a.norm() * b.norm())
    assert torch.isclose(matrix_correlation(A, B, "cosine"), cos)
    assert torch.isclose(matrix_correlation(A, B, "pearson"), pear)
    # pearson is invariant to adding a constant, cosine is not
    assert torch.isclose(matrix_correlation(A + 7, B, "pearson"), pear)
    assert not torch.isclose(matrix_correlation(A + 7, B, "cosine"), cos)
    assert torch.isnan(matrix_correlation(torch.ones(2, 2), B))
    with pytest.raises(ValueError, match="pearson"):
        matrix_correlation(A, B, "spearman")
    with pytest.raises(ValueError, match="shapes"):
        matrix_correlation(A, B[:1])


def test_nfm_agop_alignment_identity() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 4, generator=g, dtype=torch.float64)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    K = M @ M.t()
    assert torch.allclose(nfm(W), W.t() @ W)
    assert torch.allclose(agop(W, K), W.t() @ K @ W)
    # <W^T W, W^T K W>_F = tr(K (W W^T)^2)
    lhs = (nfm(W) * agop(W, K)).sum()
    WWt = W @ W.t()
    assert torch.isclose(lhs, torch.trace(K @ WWt @ WWt))
    assert torch.isclose(nfa_correlation(W, K, "cosine"), matrix_correlation(nfm(W), agop(W, K), "cosine"))
    assert torch.isclose(kernel_alignment(W, K), matrix_correlation(WWt, K))
    half = nfa_correlation(W, K, power=0.5)
    assert torch.isclose(half, matrix_correlation(nfm(W), psd_power(agop(W, K), 0.5)))


def test_psd_power() -> None:
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 3, generator=g, dtype=torch.float64)
    A = M @ M.t()  # rank 3, PSD
    R = psd_power(A, 0.5)
    assert torch.allclose(R @ R, A, atol=1e-10)
    assert psd_power(A, 1.0) is A
    assert torch.linalg.eigvalsh(R).min() > -1e-10


def test_decomposition_terms_sum_up() -> None:
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    D = 0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    K = M @ M.t()
    W = W0 + D
    norms = nfa_decomposition(W, W0, K)
    assert set(norms) == {"nfm_init", "nfm_cross", "nfm_centered", "agop_init", "agop_cross", "agop_centered"}
    assert math.isclose(norms["nfm_init"], float(nfm(W0).norm()))
    assert math.isclose(norms["nfm_centered"], float(nfm(D).norm()))
    assert math.isclose(norms["nfm_cross"], float((nfm(W) - nfm(W0) - nfm(D)).norm()))
    assert math.isclose(norms["agop_cross"], float((agop(W, K) - agop(W0, K) - agop(D, K)).norm()))
    assert math.isclose(norms["agop_centered"], float(agop(D, K).norm()))


@pytest.mark.parametrize("method", ["pearson", "cosine"])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_uc_and_c_nfa_are_the_nfa_correlation_of_w_and_dw(method: str, power: float) -> None:
    g = torch.Generator().manual_seed(3)
    W0, D, A = (torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    W, K = W0 + 0.1 * D, A @ A.T / 4
    assert torch.equal(uc_nfa(W, K, method, power), nfa_correlation(W, K, method, power))
    assert torch.equal(c_nfa(W, W0, K, method, power), nfa_correlation(W - W0, K, method, power))
    assert torch.isnan(c_nfa(W, W.clone(), K, method, power))
    assert math.isclose(float(relative_change(W, W - W0)), float((W - W0).norm() / W.norm()), rel_tol=1e-15)
    assert torch.isnan(relative_change(torch.zeros_like(W), D))


@pytest.mark.parametrize("method", ["pearson", "cosine"])
def test_output_space_route_gives_the_d_by_d_values(method: str) -> None:
    """A layer with k < d is summarised from k x k Gram matrices: the values of the d x d route (float64),
    and from float32 weights as close to a float64 reference as the d x d route is."""
    from diagnostics.nfa import nfa_summary

    torch.manual_seed(0)
    k, d = 48, 200
    W0 = torch.randn(k, d, dtype=torch.float64) / d**0.5
    W = W0 + 0.3 * torch.randn(k, d, dtype=torch.float64) / d**0.5 + 0.05  # a large mean entry: Pearson's centring
    J = torch.randn(k, 2 * k, dtype=torch.float64)
    K = J @ J.t() / (2 * k)
    keys = ("uc_nfa", "c_nfa", "kernel_alignment", "rel_change")
    truth = nfa_summary(W, W0, K, method, keep_matrices=True)  # keeping the matrices takes the d x d route
    got = nfa_summary(W, W0, K, method, keep_matrices=False)
    assert got["nfm"] is None and got["agop"] is None
    for key in keys:
        assert got[key] == pytest.approx(truth[key], abs=1e-12), key
    for key, value in truth["norms"].items():
        assert got["norms"][key] == pytest.approx(value, rel=1e-12), key
    f32 = [t.float() for t in (W, W0, K)]
    d_by_d, gram = nfa_summary(*f32, method, keep_matrices=True), nfa_summary(*f32, method, keep_matrices=False)
    for key in keys:
        assert abs(gram[key] - truth[key]) <= max(3e-8, abs(d_by_d[key] - truth[key])), key
    for key, value in truth["norms"].items():
        assert abs(gram["norms"][key] - value) <= max(1e-7 * value, abs(d_by_d["norms"][key] - value)), key
    same = nfa_summary(W, W, K, method, keep_matrices=False)  # dW = 0: no C-NFA, as on the d x d route
    assert math.isnan(same["c_nfa"]) and math.isnan(nfa_summary(W, W, K, method, keep_matrices=True)["c_nfa"])
    assert same["norms"]["nfm_cross"] == 0 and same["norms"]["agop_centered"] == 0


def test_memory_estimate_follows_the_summary_route() -> None:
    from diagnostics.correlation import CORR_BLOCK
    from diagnostics.output_space import output_space_memory
    from diagnostics.nfa import summary_memory

    k, d = 64, 512
    corr_blocks = 4 * 8 * min(CORR_BLOCK, k * k)
    assert summary_memory(k, d, 4, device=torch.device("cpu")) == output_space_memory(k, d, 4) + corr_blocks
    # kept matrices, another AGOP power, k >= d or MPS (float32 sums): the d x d route
    d_by_d = summary_memory(k, d, 4, device=torch.device("mps"))
    assert d_by_d > output_space_memory(k, d, 4) and d_by_d >= 4 * 2 * d * d
    assert summary_memory(k, d, 4, keep_matrices=True) == d_by_d  # the kept F and G are formed anyway
    assert summary_memory(k, d, 4, power=0.5) > d_by_d
    assert summary_memory(d, k, 4) != output_space_memory(d, k, 4)


@pytest.mark.parametrize("method", ["pearson", "cosine"])
def test_every_correlation_lies_in_minus_one_one(method: str) -> None:
    """Perfectly (anti-)correlated matrices give correlations of magnitude 1 up to rounding; what the library
    reports never leaves [-1, 1] (d x d and k x k routes, the analytic output-layer record)."""
    from diagnostics.nfa import nfa_summary
    from diagnostics.output_layer import identity_kernel_alignment, output_layer_summary

    values = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(7, 5, generator=g, dtype=torch.float64)
        values += [matrix_correlation(A, A, method), matrix_correlation(A, -3 * A, method)]
        W, W0 = torch.randn(3, 6, generator=g, dtype=torch.float64), torch.randn(3, 6, generator=g, dtype=torch.float64)
        eye = torch.eye(3, dtype=torch.float64)  # K = I: AGOP = NFM, UC-NFA = C-NFA = 1
        for keep in (True, False):
            record = nfa_summary(W, W0, eye, method, keep_matrices=keep)
            values += [torch.tensor(record["uc_nfa"]), torch.tensor(record["c_nfa"])]
        record = output_layer_summary(W, W0, method)
        values += [torch.tensor(record["uc_nfa"]), torch.tensor(record["c_nfa"])]
        Q, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
        values.append(identity_kernel_alignment(2.5 * Q.t(), method))  # W W^T = 6.25 I
    values = torch.stack([v.reshape(()) for v in values])
    assert values.abs().max() <= 1.0
    assert (values.abs() - 1).abs().max() < 1e-12  # all of them are +-1 up to rounding


def _exact_pearson(F: list, G: list) -> float:
    """Pearson correlation of two matrices of Fractions, exact up to the final square root."""
    from fractions import Fraction

    n = len(F) * len(F[0])
    f = [x for row in F for x in row]
    g = [x for row in G for x in row]
    mf, mg = sum(f, Fraction(0)) / n, sum(g, Fraction(0)) / n
    fg = sum((a - mf) * (b - mg) for a, b in zip(f, g))
    ff, gg = sum((a - mf) ** 2 for a in f), sum((b - mg) ** 2 for b in g)
    return float(fg) / math.sqrt(float(ff) * float(gg))


def test_output_space_route_centres_without_cancellation() -> None:
    """A weight whose entries' mean dwarfs their spread: the k x k route agrees with the d x d route to 1e-9
    relative and with exact rational arithmetic to 1e-12; a constant weight gives NaN on both routes."""
    from fractions import Fraction

    from diagnostics.nfa import nfa_summary

    keys = ("uc_nfa", "c_nfa", "kernel_alignment")
    J = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for value in (0.1, 1 / 3, 1.1):
        W = torch.full((4, 6), value, dtype=torch.float64)  # a constant W: a constant NFM, no Pearson correlation
        assert math.isnan(nfa_summary(W, torch.zeros_like(W), J @ J.t())["uc_nfa"])
        assert math.isnan(nfa_summary(W, torch.zeros_like(W), J @ J.t(), keep_matrices=False)["uc_nfa"]), value
    for sigma in (1e-6, 1e-7):
        g = torch.Generator().manual_seed(1)
        k, d = 8, 32
        W = 1 + sigma * torch.randn(k, d, generator=g, dtype=torch.float64)
        W0 = 1 + sigma * torch.randn(k, d, generator=g, dtype=torch.float64)
        J = torch.randn(k, k, generator=g, dtype=torch.float64)
        K = J @ J.t() / k
        d_by_d, gram = nfa_summary(W, W0, K, keep_matrices=True), nfa_summary(W, W0, K, keep_matrices=False)
        for key in keys:
            assert gram[key] == pytest.approx(d_by_d[key], rel=1e-9, abs=0), (sigma, key)
    g = torch.Generator().manual_seed(2)
    k, d = 3, 7
    W = 1 + 1e-8 * torch.randn(k, d, generator=g, dtype=torch.float64)
    J = torch.randn(k, k, generator=g, dtype=torch.float64)
    K = J @ J.t()
    Wf = [[Fraction(x) for x in row] for row in W.tolist()]
    Kf = [[Fraction(x) for x in row] for row in K.tolist()]
    KW = [[sum(Kf[i][m] * Wf[m][j] for m in range(k)) for j in range(d)] for i in range(k)]
    F = [[sum(Wf[m][i] * Wf[m][j] for m in range(k)) for j in range(d)] for i in range(d)]
    G = [[sum(Wf[m][i] * KW[m][j] for m in range(k)) for j in range(d)] for i in range(d)]
    exact = _exact_pearson(F, G)
    assert nfa_summary(W, torch.zeros_like(W), K, keep_matrices=False)["uc_nfa"] == pytest.approx(exact, rel=1e-12)


def test_identity_kernel_alignment_centres_without_cancellation() -> None:
    """rho(W W^T, I) of the analytic output-layer record for a weight whose entries' mean dwarfs their
    spread: within 1e-9 of exact rational arithmetic; NaN for a constant weight."""
    from fractions import Fraction

    from diagnostics.output_layer import identity_kernel_alignment

    for value in (0.1, 1 / 3):
        assert math.isnan(identity_kernel_alignment(torch.full((12, 5), value, dtype=torch.float64)))
    k, d = 12, 5
    for sigma in (1e-6, 1e-7):
        W = 1 + sigma * torch.randn(k, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        Wf = [[Fraction(x) for x in row] for row in W.tolist()]
        A = [[sum(a * b for a, b in zip(Wf[i], Wf[j])) for j in range(k)] for i in range(k)]
        eye = [[Fraction(int(i == j)) for j in range(k)] for i in range(k)]
        assert float(identity_kernel_alignment(W)) == pytest.approx(_exact_pearson(A, eye), rel=1e-9), sigma


def _reference_summary(W: torch.Tensor, W0: torch.Tensor, K: torch.Tensor, method: str, power: float) -> dict:
    """The record of ``nfa_summary`` from the definitions, in float64."""
    D = W - W0
    F, G, FD, GD = W.t() @ W, W.t() @ K @ W, D.t() @ D, D.t() @ K @ D
    cross = lambda X: (X + X.t()).norm()  # noqa: E731
    return {
        "uc_nfa": float(matrix_correlation(F, psd_power(G, power), method)),
        "c_nfa": float(matrix_correlation(FD, psd_power(GD, power), method)),
        "kernel_alignment": float(matrix_correlation(W @ W.t(), K, method)),
        "rel_change": float(D.norm() / W.norm()),
        "norms": {
            "nfm_init": float((W0.t() @ W0).norm()), "nfm_cross": float(cross(W0.t() @ D)),
            "nfm_centered": float(FD.norm()), "agop_init": float((W0.t() @ K @ W0).norm()),
            "agop_cross": float(cross(W0.t() @ K @ D)), "agop_centered": float(GD.norm()),
        },
        "nfm": F, "agop": G,
    }


@pytest.mark.parametrize("method", ["pearson", "cosine"])
@pytest.mark.parametrize("power", [1.0, 0.5])
@pytest.mark.parametrize("keep", [True, False])
def test_d_by_d_route_gives_the_definitions(one_thread, method: str, power: float, keep: bool) -> None:
    """The d x d route (F and G summed from their decomposition terms, the kernel alignment without W W^T)
    equals the definitions to 1e-9 relative in float64 (k > d and k = d), also when the entries' mean
    dwarfs their spread (a raw-moment formula for rho(W W^T, K) would be off by ~1e-8 there); a constant
    weight gives NaN where the definition does."""
    from diagnostics.nfa import nfa_summary

    g = torch.Generator().manual_seed(7)
    for k, d, base in ((40, 12, 0.0), (12, 12, 0.0), (40, 12, 1e4)):
        W0 = base + torch.randn(k, d, generator=g, dtype=torch.float64)
        W = W0 + 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
        J = torch.randn(k, 2 * k, generator=g, dtype=torch.float64)
        K = J @ J.t() / k + 0.5
        got, ref = nfa_summary(W, W0, K, method, power, keep_matrices=keep), _reference_summary(W, W0, K, method, power)
        for key in ("c_nfa", "kernel_alignment", "rel_change", *(("uc_nfa",) if power == 1 or base == 0 else ())):
            assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=0), (k, d, base, key)
        assert got["norms"] == pytest.approx(ref["norms"], rel=1e-9)
        if keep:
            assert torch.allclose(got["nfm"], ref["nfm"], rtol=1e-12, atol=0)
            assert torch.allclose(got["agop"], ref["agop"], rtol=1e-12, atol=1e-12 * float(ref["agop"].abs().max()))
        else:
            assert got["nfm"] is None and got["agop"] is None
    W = torch.full((12, 5), 1 / 3, dtype=torch.float64)  # constant: W W^T constant, no Pearson correlation
    K = torch.randn(12, 12, generator=g, dtype=torch.float64)
    K = K @ K.t()
    got = nfa_summary(W, torch.zeros_like(W), K, method, power, keep_matrices=keep)["kernel_alignment"]
    if method == "pearson":
        assert math.isnan(got)
    else:
        assert got == pytest.approx(float(matrix_correlation(W @ W.t(), K, method)), rel=1e-12)


def test_an_asymmetric_K_is_refused_by_name() -> None:
    from diagnostics.nfa import nfa_decomposition, nfa_summary

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(6, 4, generator=g, dtype=torch.float64)
    J = torch.randn(10, 6, generator=g, dtype=torch.float64)
    K = J.t() @ J
    nfa_summary(W, W0, K)  # symmetric: accepted
    nfa_summary(W.float(), W0.float(), (J.t().float() @ J.float()))  # symmetric up to float32 rounding
    bad = K.clone()
    bad[0, 1] += 0.5 * K.abs().max()
    wide, wide0 = W.t().contiguous(), W0.t().contiguous()  # k = 4 < d = 6: the k x k route
    bad_small = bad[:4, :4]
    # an asymmetry small against max |K| but not against the entries it sits between (dynamic range)
    scaled = torch.diag(torch.tensor([1e6, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    scaled[1, 2] = 1.0
    nfa_summary(W.bfloat16(), W0.bfloat16(), (J.t() @ J).bfloat16())  # half precision: its own rounding
    for fn in (lambda: nfa_summary(W, W0, bad), lambda: nfa_decomposition(W, W0, bad),
               lambda: nfa_summary(wide, wide0, bad_small), lambda: nfa_summary(W, W0, scaled)):
        with pytest.raises(ValueError, match="symmetric"):
            fn()


@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])  # the d x d and the k x k route
def test_nfa_summary_reads_its_values_once(shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    # one host transfer per layer (a synchronisation on a GPU), the symmetry check of K included
    from diagnostics.nfa import nfa_summary

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    W = W0 + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)
    J = torch.randn(10, shape[0], generator=g, dtype=torch.float64)
    reads = []
    for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, **k: reads.append(1) or _real(self, *a, **k))
    nfa_summary(W, W0, J.t() @ J, keep_matrices=False)
    monkeypatch.undo()
    assert len(reads) == 1
