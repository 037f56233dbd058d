"""PTK covariance K and layer Jacobians against independent references (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

from diagnostics import agop, find_linear_layers, layer_jacobians, ptk_covariance


def mlp(inplace: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 4)
    ).double()


def reference_K(model: nn.Module, x: torch.Tensor, layers: list[str], batch_dims: int = 1) -> dict:
    """The authors' method: jacrev of the outputs w.r.t. zero perturbations added to every
    pre-activation, vmap-ed over samples; K = sum over samples, outputs and positions of g g^T / N."""
    modules = dict(model.named_modules())
    shapes = {}
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, o.shape[1:]))
        for n in layers
    ]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()

    def one_sample(xi: torch.Tensor) -> dict:
        def f_of_eps(eps: dict) -> torch.Tensor:
            hs = [
                modules[n].register_forward_hook(lambda m, i, o, n=n: o + eps[n].unsqueeze(0)) for n in layers
            ]
            try:
                out = model(xi.unsqueeze(0))
            finally:
                for h in hs:
                    h.remove()
            out = out if isinstance(out, torch.Tensor) else out.logits
            return out.reshape(-1)

        zeros = {n: torch.zeros(shapes[n], dtype=x.dtype if x.is_floating_point() else torch.float64) for n in layers}
        return jacrev(f_of_eps)(zeros)

    model.eval()
    jac = vmap(one_sample)(x)  # name -> (B, C, *h_shape)
    out = {}
    for n in layers:
        J = jac[n].detach()
        if len(shapes[n]) == 3:  # conv output (channels, H, W): channels last
            J = J.movedim(2, -1)
        k = J.shape[-1]
        rows = J.reshape(J.shape[0], J.shape[1], -1, k)  # (B, C, positions, k)
        n_rows = rows.shape[0] * rows.shape[2]
        out[n] = torch.einsum("bcpk,bcpl->kl", rows, rows) / n_rows
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_exact_K_matches_jacrev_reference_mlp_with_bias() -> None:
    model = mlp()
    x = torch.randn(23, 5, dtype=torch.float64)
    ref = reference_K(model, x, ["0", "2", "4"])
    for chunk in (None, 5):
        K = ptk_covariance(model, x, chunk_size=chunk)
        assert set(K) == {"0", "2", "4"}
        for n in K:
            assert K[n].shape == ref[n].shape
            assert rel_err(K[n], ref[n]) < 1e-9


def test_inplace_activation_after_layer_does_not_change_K() -> None:
    x = torch.randn(10, 5, dtype=torch.float64)
    K_plain = ptk_covariance(mlp(False), x)
    K_inplace = ptk_covariance(mlp(True), x)
    for n in K_plain:
        assert rel_err(K_inplace[n], K_plain[n]) < 1e-12


def test_agop_from_K_equals_input_gradients() -> None:
    model = mlp()
    x = torch.randn(17, 5, dtype=torch.float64)
    K = ptk_covariance(model, x)
    for name, layer in find_linear_layers(model).items():
        captured = {}

        def leaf_input(module, args):
            captured["x"] = args[0].detach().requires_grad_(True)
            return (captured["x"],)

        handle = layer.module.register_forward_pre_hook(leaf_input)
        f = model(x)
        handle.remove()
        grads = [torch.autograd.grad(f[:, c].sum(), captured["x"], retain_graph=True)[0] for c in range(f.shape[1])]
        direct = sum(g.t() @ g for g in grads) / x.shape[0]
        W = layer.weight_matrix().detach()
        assert rel_err(agop(W, K[name]), direct) < 1e-10


def test_layer_jacobians_shapes_and_gram() -> None:
    model = mlp()
    x = torch.randn(9, 5, dtype=torch.float64)
    jac = layer_jacobians(model, x, ["0", "4"], chunk_size=4)
    K = ptk_covariance(model, x, layers=["0", "4"])
    X, G = jac["0"]
    assert X.shape == (9, 5) and G.shape == (4, 9, 8)
    assert torch.equal(X, x)
    for n, (X, G) in jac.items():
        assert rel_err(torch.einsum("cnk,cnl->kl", G, G) / 9, K[n]) < 1e-12
    # rows of X are the layer inputs
    X4 = jac["4"][0]
    assert torch.allclose(X4, torch.tanh(model[2](model[1](model[0](x)))))


def test_sketch_is_unbiased_and_error_falls_like_inverse_sqrt_m() -> None:
    model = mlp()
    x = torch.randn(12, 5, dtype=torch.float64)
    exact = ptk_covariance(model, x, layers=["0"])["0"]
    gen = torch.Generator().manual_seed(1)
    draws = [ptk_covariance(model, x, layers=["0"], estimator="sketch", m=1, generator=gen)["0"] for _ in range(300)]
    single = sum(rel_err(d, exact) for d in draws) / len(draws)
    mean = torch.stack(draws).mean(0)
    assert rel_err(mean, exact) < single / 8  # the mean of 300 draws is ~sqrt(300) x closer
    errs = {}
    for m in (2, 32):
        gen = torch.Generator().manual_seed(2)
        e = [rel_err(ptk_covariance(model, x, layers=["0"], estimator="sketch", m=m, generator=gen)["0"], exact)
             for _ in range(40)]
        errs[m] = sum(e) / len(e)
    assert 2.5 < errs[2] / errs[32] < 6.5  # sqrt(16) = 4


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_sketch_seeded_by_generator(dist: str) -> None:
    model = mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    a = ptk_covariance(model, x, estimator="sketch", m=3, generator=torch.Generator().manual_seed(5), sketch=dist)
    b = ptk_covariance(model, x, estimator="sketch", m=3, generator=torch.Generator().manual_seed(5), sketch=dist)
    c = ptk_covariance(model, x, estimator="sketch", m=3, generator=torch.Generator().manual_seed(6), sketch=dist)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0"], c["0"])


def test_repeated_sketches_are_one_sketch_unless_one_generator_is_shared() -> None:
    """Without a generator every call (and every monitor measurement) draws the same projections; one
    generator passed to every call draws independent ones, as the docs say."""
    from diagnostics import NFAMonitor

    model = mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    sketch = lambda **kw: ptk_covariance(model, x, layers=["0"], estimator="sketch", m=2, **kw)["0"]  # noqa: E731
    assert torch.equal(sketch(), sketch()) and torch.equal(sketch(), sketch(generator=0))
    g = torch.Generator().manual_seed(0)
    first, second = sketch(generator=g), sketch(generator=g)
    assert torch.equal(first, sketch()) and not torch.equal(first, second)
    mon = NFAMonitor(model, layers=["0"])
    a, b = (mon.measure(x, estimator="sketch", m=2, keep_matrices=True)["0"].K for _ in range(2))
    g = torch.Generator().manual_seed(0)
    c, d = (mon.measure(x, estimator="sketch", m=2, keep_matrices=True, generator=g)["0"].K for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(c, d)


def test_conv2d_layers_by_name_match_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(), nn.Linear(8, 3)
    ).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    K = ptk_covariance(model, x, layers=["0", "2", "4"])
    ref = reference_K(model, x, ["0", "2", "4"])
    for n in K:
        assert rel_err(K[n], ref[n]) < 1e-9
    X, G = layer_jacobians(model, x, ["2"])["2"]
    W = find_linear_layers(model, ["2"])["2"].weight_matrix().detach()
    with torch.no_grad():
        out = model[2](model[1](model[0](x)))  # (5, 2, 2, 2)
    assert X.shape == (5 * 2 * 2, 3 * 2 * 2) and G.shape == (3, 5 * 2 * 2, 2)
    rows = out.movedim(1, -1).reshape(-1, 2)
    assert torch.allclose(X @ W.t() + model[2].bias, rows)


def test_looped_and_batched_vjps_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    import diagnostics.vjps as vjps

    model = mlp()
    x = torch.randn(11, 5, dtype=torch.float64)
    batched = ptk_covariance(model, x, chunk_size=4)
    monkeypatch.setattr(vjps, "BATCHED_VJP", False)
    looped = ptk_covariance(model, x, chunk_size=4)
    jac = layer_jacobians(model, x, ["2"])
    for n in batched:
        assert rel_err(looped[n], batched[n]) < 1e-12
    assert jac["2"][1].shape == (4, 11, 7)


def test_ptk_sums_take_one_estimator_settings() -> None:
    from diagnostics import LayerHooks
    from diagnostics.kernel import unpack_sum
    from diagnostics.ptk import ptk_sums, ptk_sums_all_ranks
    from diagnostics.settings import EstimatorSettings

    model, x = mlp(), torch.randn(6, 5, dtype=torch.float64)
    hooks = LayerHooks(find_linear_layers(model))
    sums, counts = ptk_sums(model, hooks, x, EstimatorSettings(chunk_size=4))
    all_sums, _ = ptk_sums_all_ranks(model, hooks, x, EstimatorSettings(chunk_size=4))
    K = ptk_covariance(model, x)
    assert counts == {n: 6 for n in K}
    assert all(rel_err(unpack_sum(sums[n], K[n].shape[0], torch.float64, 6), K[n]) < 1e-12 for n in K)  # packed upper triangle
    assert all(torch.equal(sums[n], all_sums[n]) for n in K)
    with pytest.raises(TypeError, match="settings must be an EstimatorSettings, e.g. EstimatorSettings"):
        ptk_sums(model, hooks, x, "sketch")
    with pytest.raises(TypeError):
        ptk_sums(model, hooks, x, EstimatorSettings(), 8)  # the options go inside the settings
