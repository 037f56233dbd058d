"""Theory tools: the early-time C-NFA prediction, the random-kernel control, the target EGOP.

- :func:`early_cnfa_prediction` - the paper's early-time analysis (Beaglehole, Mitliagkas,
  Agarwala 2024, arXiv 2402.05271): after one small full-batch gradient step on the MSE loss
  from ``W_0`` the weight change is ``dW ∝ Σ_{α,c} r_{α,c} g_{α,c} x_α^T`` and the C-NFA tends to
  ``ρ(X^T R 𝒦 R X, X^T R 𝒦² R X) = ρ(dW^T dW, dW^T K dW)``.
- :func:`randomize_kernel` - ``Q Λ Q^T`` with ``K``'s spectrum ``Λ`` and a Haar-random ``Q``.
- :func:`egop` - ``E_x[∇f*(x) ∇f*(x)^T]`` of any target by autograd.
- :func:`feature_quality` - ``ρ(F, EGOP)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .common import accumulation_dtype, eval_mode
from .correlation import matrix_correlation
from .engine import for_each_chunk
from .hooks import LayerHooks
from .kernel import unpack_sum, work_dtype
from .layers import find_linear_layers
from .nfa import nfa_correlation
from .probe import Chunk, default_output
from .ptk import ptk_sums
from .settings import EstimatorSettings
from .vjps import VJPPlan, vjp

__all__ = ["early_cnfa_prediction", "randomize_kernel", "egop", "feature_quality"]


def _outputs(model: nn.Module, X: Tensor, output_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``f(X)`` in eval mode, mapped like :func:`diagnostics.ptk_covariance` maps it (``output_fn``, else the
    output itself or its ``.logits``); every submodule's train/eval flag is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        out = model(X)
        return output_fn(out) if output_fn is not None else default_output(out)


def early_weight_change(
    model: nn.Module,
    layer: str,
    X: Tensor,
    Y: Tensor,
    output_fn: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(dW, K_sum)`` at the current weights: ``dW = Σ_{α,c} r_{α,c} g_{α,c} x_α^T`` (``(k, d)``), the direction
    of one full-batch GD step on ``½ Σ (y - f)^2``, with residuals ``r = Y - f(X)``, and the unnormalised
    ``K_sum = Σ_{α,c} g_{α,c} g_{α,c}^T = N K`` (``(k, k)``), in eval mode.

    ``Y`` has the shape of the (``output_fn``-mapped) model output ``(B, ...)``. The sum runs over the
    layer's rows ``α``: every token of a layer applied per token, and every call of a layer called several
    times per forward pass, each paired with its own input row. ``Σ_c r_c g_c`` for all rows at once is
    one vector-Jacobian product with the residuals as the cotangent.
    """
    if not isinstance(layer, str):
        raise TypeError(f"early_cnfa_prediction: layer must be a module name (str), got {type(layer).__name__}")
    f = _outputs(model, X, output_fn)
    if Y.shape != f.shape:
        raise ValueError(
            f"early_cnfa_prediction: Y must have the shape of the model output {tuple(f.shape)}, got "
            f"{tuple(Y.shape)}; reshape the targets (e.g. Y[:, None] for one output)"
        )
    adapters = find_linear_layers(model, [layer])
    adapter = adapters[layer]
    dtype = work_dtype(adapter)
    R = Y.to(device=f.device, dtype=f.dtype) - f
    dW = torch.zeros(adapter.k, adapter.d, dtype=accumulation_dtype(f.device), device=adapter.weight_matrix().device)
    plan = VJPPlan()

    def visit(chunk: Chunk) -> None:
        v = R[chunk.start : chunk.start + chunk.f.shape[0]].to(chunk.f.dtype).unsqueeze(0)
        (hs,), (xs,) = chunk.outputs.values(), chunk.inputs.values()
        plan.names = [layer] * len(hs)  # one target per call of the layer
        for grads in vjp(chunk.f, hs, v, plan):
            for g, x in zip(grads, xs):  # one (gradient, input) pair per call of the layer
                rows_g = adapter.out_rows(g, lead=1)[0].to(dW.dtype)
                dW.add_(rows_g.t() @ adapter.in_rows(x).to(dW.dtype))

    for_each_chunk(model, LayerHooks(adapters), X, visit, output_fn=output_fn, keep_inputs=True)
    sums, _ = ptk_sums(model, LayerHooks(adapters), X, EstimatorSettings("exact", output_fn=output_fn))
    K_sum = unpack_sum(sums[layer], adapter.k, sums[layer].dtype)
    return dW.to(dtype), K_sum.to(dtype)


def early_cnfa_prediction(
    model: nn.Module,
    layer: str,
    X: Tensor,
    Y: Tensor,
    output_fn: Callable[[Tensor], Tensor] | None = None,
    method: str = "pearson",
) -> Tensor:
    """Early-time C-NFA prediction (arXiv 2402.05271) for ``layer`` at the current weights ``W_0``, MSE loss:

    ``ρ(X^T R 𝒦 R X, X^T R 𝒦² R X) = ρ(dW^T dW, dW^T K dW)`` with ``dW = Σ_{α,c} r_{α,c} g_{α,c} x_α^T``,
    ``r = Y - f(X)``, ``K = (1/N) Σ_{α,c} g_{α,c} g_{α,c}^T`` (no ``nC x nC`` Gram is formed; ``ρ`` does not
    depend on the scale of ``K``, so the unnormalised ``N K`` is used). It is the limit of the C-NFA measured
    after one full-batch GD step as the step size goes to zero. Returns a 0-dim tensor.
    """
    dW, K_sum = early_weight_change(model, layer, X, Y, output_fn)
    if not torch.any(dW != 0):
        raise ValueError(
            f"early_cnfa_prediction: the gradient direction of layer {layer!r} is zero (zero residuals or "
            "dead layer); the prediction is undefined"
        )
    return nfa_correlation(dW, K_sum, method=method)


def randomize_kernel(K: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``Q Λ Q^T``: same eigenvalues ``Λ`` as the symmetric ``K``, Haar-random orthogonal eigenvectors ``Q``.

    ``Q`` is the QR factor of a standard Gaussian matrix with the signs of ``diag(R)`` absorbed
    (Mezzadri 2007), drawn from ``generator`` on the CPU; the result has ``K``'s dtype and device.
    """
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"randomize_kernel: K must be a square matrix, got shape {tuple(K.shape)}")
    if not K.is_floating_point():
        raise TypeError(f"randomize_kernel: K must be floating point, got {K.dtype}")
    Kd = K.detach().to("cpu", torch.float64)
    if not torch.allclose(Kd, Kd.T, rtol=1e-5, atol=1e-8 * float(Kd.abs().max().clamp_min(1e-300))):
        raise ValueError("randomize_kernel: K must be symmetric (a PTK covariance); symmetrise it with (K + K.T) / 2")
    evals = torch.linalg.eigvalsh((Kd + Kd.T) / 2)
    Z = torch.randn(K.shape, generator=generator, dtype=torch.float64)
    Q, Rf = torch.linalg.qr(Z)
    Q = Q * torch.sign(torch.diagonal(Rf))
    return ((Q * evals) @ Q.T).to(K.device, K.dtype)


def egop(target_fn: Callable[[Tensor], Tensor], X: Tensor) -> Tensor:
    """Expected gradient outer product ``E = (1/n) Σ_α Σ_c ∇f*_c(x_α) ∇f*_c(x_α)^T`` (``(d, d)``) by autograd.

    ``target_fn`` maps a batch ``(n, d)`` to ``(n,)`` or ``(n, C)`` and must act sample-wise (row ``α`` of
    its output depends on ``x_α`` only), so the gradient of a column sum gives every sample's gradient.
    """
    if X.ndim != 2:
        raise ValueError(f"egop: X must be a batch of shape (n, d), got {tuple(X.shape)}")
    x = X.detach().clone().requires_grad_(True)
    y = target_fn(x)
    if y.shape[0] != X.shape[0] or y.ndim > 2:
        raise ValueError(f"egop: target_fn must return (n,) or (n, C) for n = {X.shape[0]}, got {tuple(y.shape)}")
    y = y.reshape(X.shape[0], -1)
    E = X.new_zeros(X.shape[1], X.shape[1])
    for c in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, c].sum(), x, retain_graph=c + 1 < y.shape[1])
        E += g.T @ g
    return E / X.shape[0]


def feature_quality(F: Tensor, E: Tensor, method: str = "pearson") -> Tensor:
    """Feature quality ``ρ(F, E)``: correlation of a neural feature matrix ``F = W^T W`` with a target EGOP."""
    if F.shape != E.shape:
        raise ValueError(f"feature_quality: F {tuple(F.shape)} and E {tuple(E.shape)} must have the same shape")
    return matrix_correlation(F, E.to(F.dtype), method=method)
