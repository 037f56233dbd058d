"""Theory tools: early-time C-NFA prediction, random-kernel control, target EGOP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diagnostics import (
    early_cnfa_prediction,
    egop,
    feature_quality,
    find_linear_layers,
    matrix_correlation,
    nfa_correlation,
    nfm,
    ptk_covariance,
    randomize_kernel,
)
from diagnostics.theory import early_weight_change


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def _mlp(act: type[nn.Module], d: int = 6, width: int = 12, outputs: int = 3, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, width, bias=False), act(), nn.Linear(width, width, bias=False), act(),
        nn.Linear(width, outputs, bias=False),
    ).double()


def _measured_cnfa_after_gd_step(model: nn.Module, layer: str, X: torch.Tensor, Y: torch.Tensor, eta: float) -> float:
    """C-NFA of ``layer`` after one full-batch GD step on ``½ Σ (y - f)^2`` (all layers move)."""
    W0 = find_linear_layers(model, [layer])[layer].weight_matrix().detach().clone()
    model.zero_grad()
    (0.5 * ((model(X) - Y) ** 2).sum()).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= eta * p.grad
    W1 = find_linear_layers(model, [layer])[layer].weight_matrix().detach()
    K1 = ptk_covariance(model, X, layers=[layer])[layer]
    return float(nfa_correlation(W1 - W0, K1))


@pytest.mark.parametrize("act", [nn.ReLU, Square], ids=["relu", "quadratic"])
@pytest.mark.parametrize("layer", ["0", "2"])
def test_early_prediction_matches_one_gd_step(act: type[nn.Module], layer: str) -> None:
    model = _mlp(act)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    predicted = float(early_cnfa_prediction(model, layer, X, Y))
    measured = _measured_cnfa_after_gd_step(model, layer, X, Y, eta=1e-7)
    assert abs(predicted - measured) <= 1e-4
    # a non-trivial value (the test would be vacuous if both were ~1)
    assert predicted < 0.999


def test_early_prediction_equals_gram_formula() -> None:
    """rho(dW^T dW, dW^T K dW) == rho(X^T R 𝒦 R X, X^T R 𝒦² R X) with the (nC x nC) PTK Gram 𝒦."""
    model = _mlp(nn.ReLU, outputs=2)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(15, 6, generator=g, dtype=torch.float64)
    Y = torch.randn(15, 2, generator=g, dtype=torch.float64)
    # explicit Jacobians of f_c(x_alpha) w.r.t. the first pre-activation h = W x
    W = model[0].weight.detach()
    rest = model[1:]

    def f_of_h(h: torch.Tensor) -> torch.Tensor:
        return rest(h)

    H = X @ W.T
    J = torch.stack([torch.autograd.functional.jacobian(f_of_h, h[None])[0, :, 0] for h in H])  # (n, C, k)
    n, C, k = J.shape
    Grows = J.reshape(n * C, k)  # row (alpha, c)
    gram = Grows @ Grows.T
    Xrows = X.repeat_interleave(C, dim=0)
    R = torch.diag((Y - model(X).detach()).reshape(-1))
    A = Xrows.T @ R @ gram @ R @ Xrows
    B = Xrows.T @ R @ gram @ gram @ R @ Xrows
    expected = float(matrix_correlation(A, B))
    assert float(early_cnfa_prediction(model, "0", X, Y)) == pytest.approx(expected, abs=1e-10)


def test_early_prediction_rejects_bad_targets() -> None:
    model = _mlp(nn.ReLU)
    X = torch.randn(5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape of the model output"):
        early_cnfa_prediction(model, "0", X, torch.zeros(5, dtype=torch.float64))


def test_randomize_kernel_keeps_spectrum_changes_eigenvectors() -> None:
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    K = A @ A.T
    Kr = randomize_kernel(K, generator=torch.Generator().manual_seed(1))
    assert Kr.dtype == K.dtype and Kr.shape == K.shape
    assert torch.allclose(Kr, Kr.T, atol=1e-10)
    assert torch.allclose(torch.linalg.eigvalsh(Kr), torch.linalg.eigvalsh(K), rtol=1e-9, atol=1e-9)
    # top eigenvectors are unrelated: |cos| of a Haar-random unit vector with a fixed one is ~ 1/sqrt(30)
    u = torch.linalg.eigh(K).eigenvectors[:, -1]
    v = torch.linalg.eigh(Kr).eigenvectors[:, -1]
    assert abs(float(u @ v)) < 0.6
    assert float(matrix_correlation(K, Kr)) < 0.5
    # reproducible from the generator, different for another seed
    assert torch.equal(Kr, randomize_kernel(K, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(Kr, randomize_kernel(K, generator=torch.Generator().manual_seed(2)))


def test_randomize_kernel_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        randomize_kernel(torch.zeros(3, 4))


def test_egop_chain_monomial_closed_form() -> None:
    r, d = 3, 8
    X = torch.randn(200_000, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    E = egop(lambda x: (x[:, :r] * x[:, 1 : r + 1]).sum(dim=1), X)
    expected = torch.zeros(d, d, dtype=torch.float64)
    expected[:4, :4] = torch.tensor(
        [[1.0, 0, 1, 0], [0, 2, 0, 1], [1, 0, 2, 0], [0, 1, 0, 1]], dtype=torch.float64
    )
    assert torch.allclose(E, expected, atol=0.03)
    assert torch.allclose(E, E.T)


def test_egop_exact_for_linear_multi_output_target() -> None:
    A = torch.randn(3, 5, dtype=torch.float64)
    X = torch.randn(17, 5, dtype=torch.float64)
    assert torch.allclose(egop(lambda x: x @ A.T, X), A.T @ A, atol=1e-12)


def test_feature_quality_is_matrix_correlation() -> None:
    W = torch.randn(7, 5, dtype=torch.float64)
    E = torch.randn(5, 5, dtype=torch.float64)
    E = E @ E.T
    assert float(feature_quality(nfm(W), E)) == pytest.approx(float(matrix_correlation(W.T @ W, E)))
    assert float(feature_quality(E, E)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same shape"):
        feature_quality(torch.eye(3), torch.eye(4))


def test_early_prediction_token_wise_layer() -> None:
    """A layer applied per token: every token of a sample uses that sample's residuals (outputs = T x V)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 10, bias=False), nn.Tanh(), nn.Linear(10, 4, bias=False)).double()
    g = torch.Generator().manual_seed(4)
    X = torch.randn(6, 3, 5, generator=g, dtype=torch.float64)  # (B, T, d)
    Y = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)  # (B, T, V)
    predicted = float(early_cnfa_prediction(model, "0", X, Y))
    measured = _measured_cnfa_after_gd_step(model, "0", X, Y, eta=1e-7)
    assert abs(predicted - measured) <= 1e-4


def test_early_prediction_restores_submodule_modes_and_reads_logits() -> None:
    """Mixed train/eval flags survive (model.train(True) used to reset them); dict outputs use ``logits``."""
    model = _mlp(nn.ReLU)
    X = torch.randn(20, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Y = torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = early_cnfa_prediction(model, "2", X, Y)
    model.train()
    model[1].eval()
    early_cnfa_prediction(model, "2", X, Y)
    assert model.training and not model[1].training and model[3].training

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.net(x)}

    assert torch.allclose(early_cnfa_prediction(Wrapped(), "net.2", X, Y), expected, rtol=1e-12, atol=0)


def test_early_prediction_layer_called_twice() -> None:
    """A layer applied twice per forward pass: each call's gradient pairs with that call's input."""
    torch.manual_seed(5)
    shared = nn.Linear(6, 6, bias=False)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(),
                          nn.Linear(6, 3, bias=False)).double()
    g = torch.Generator().manual_seed(6)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    Y = torch.randn(30, 3, generator=g, dtype=torch.float64)
    dW, _ = early_weight_change(model, "2", X, Y)
    model.zero_grad()
    (0.5 * ((model(X) - Y) ** 2).sum()).backward()  # autograd sums over both calls
    assert torch.allclose(dW, -shared.weight.grad, rtol=1e-10, atol=1e-12)
    predicted = float(early_cnfa_prediction(model, "2", X, Y))
    measured = _measured_cnfa_after_gd_step(model, "2", X, Y, eta=1e-7)
    assert abs(predicted - measured) <= 1e-4
