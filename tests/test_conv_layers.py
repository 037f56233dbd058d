"""Conv2d layers of a VGG-11 (no BatchNorm, 3x3 padding 1, max-pools): K, the patch-space NFM and AGOP against
independent float64 references, and SLO treating each conv module (weight and bias) as one layer."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diagnostics import NFAMonitor, find_linear_layers, ptk_covariance
from slo_torch import SLOptimizer, promote, resolve_layers
from test_diag_ptk import reference_K, rel_err

from conftest import load_example

image_cnn = load_example("image_cnn")
conv_layers, vgg11 = image_cnn.conv_layers, image_cnn.vgg11


def tiny_vgg(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = vgg11(num_classes=4, width_mult=1 / 32).double()  # channels 2 4 8 8 16 16 16 16, classifier 128
    with torch.no_grad():  # move the biases off zero so they would show up if they wrongly entered K
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.normal_(0.0, 0.1)
    return model.eval()


def test_vgg_conv_K_matches_jacrev_reference_for_all_eight_layers() -> None:
    model = tiny_vgg()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names = conv_layers(model)
    assert len(names) == 8
    K = ptk_covariance(model, x, layers=names, chunk_size=2)
    ref = reference_K(model, x, names)  # jacrev w.r.t. zero perturbations of each conv output, per position
    for n in names:
        assert K[n].shape == ref[n].shape == (model.get_submodule(n).out_channels,) * 2
        assert rel_err(K[n], ref[n]) < 1e-10, n


def patch_agop(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """``(1/N) sum over samples, outputs c and positions p of grad_p f_c grad_p f_c^T``, the gradient taken w.r.t.
    the unfolded 3x3 patch at ``p`` as an independent input (the conv recomputed as ``W p + b`` by hand)."""
    conv = model.get_submodule(name)
    leaf: dict[str, torch.Tensor] = {}

    def as_patches(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(args[0], 3, padding=1).detach().requires_grad_(True)  # (B, in*9, H*W)
        leaf["p"] = patches
        h = module.weight.reshape(module.out_channels, -1) @ patches + module.bias[:, None]
        return h.reshape(output.shape)

    handle = conv.register_forward_hook(as_patches)
    try:
        f = model(x)
    finally:
        handle.remove()
    total = torch.zeros(leaf["p"].shape[1], leaf["p"].shape[1], dtype=torch.float64)
    for c in range(f.shape[1]):
        g = torch.autograd.grad(f[:, c].sum(), leaf["p"], retain_graph=True)[0]  # (B, in*9, H*W)
        rows = g.transpose(1, 2).reshape(-1, g.shape[1])
        total += rows.t() @ rows
    return total / (leaf["p"].shape[0] * leaf["p"].shape[2])


def test_vgg_patch_space_nfm_and_agop() -> None:
    model = tiny_vgg(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names = conv_layers(model)
    with NFAMonitor(model, layers=names) as mon:
        records = mon.measure(x, keep_matrices=True)
    for n in (names[0], names[4], names[7]):  # 32x32, 4x4 and 2x2 positions
        conv = model.get_submodule(n)
        W = conv.weight.detach().reshape(conv.out_channels, conv.in_channels * 9)
        assert torch.equal(find_linear_layers(model, [n])[n].weight_matrix().detach(), W)
        torch.testing.assert_close(records[n].nfm, W.t() @ W, rtol=1e-12, atol=0)
        assert rel_err(records[n].agop, patch_agop(model, x, n)) < 1e-10, n


def test_slo_treats_each_conv_module_as_one_layer() -> None:
    model = tiny_vgg(2).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # same forward in both passes below
    names = conv_layers(model)
    layers = resolve_layers(model, promote(model, names[0], 50.0))
    by_name = {layer.name: layer for layer in layers}
    for n in names:
        conv = model.get_submodule(n)
        assert by_name[n].params == (conv.weight, conv.bias) and by_name[n].speed == (50.0 if n == names[0] else 0.02)
    assert [layer.name for layer in layers] == [*names, "classifier.0", "classifier.3", "classifier.6"]

    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    ((model(x) - y) ** 2).mean().backward()
    grads = {n: torch.cat([p.grad.flatten() for p in by_name[n].params]) for n in by_name}
    before = {n: torch.cat([p.detach().flatten() for p in by_name[n].params]).clone() for n in by_name}
    model.zero_grad()
    lr = 0.1
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model=model, speeds=promote(model, names[0], 50.0))
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    for n, layer in by_name.items():
        after = torch.cat([p.detach().flatten() for p in layer.params])
        expected = -lr * layer.speed * grads[n] / grads[n].norm()  # weight and bias normalised jointly
        torch.testing.assert_close(after - before[n], expected, rtol=1e-9, atol=1e-15)


def test_unsupported_conv_names_what_is_unsupported() -> None:
    import pytest

    for kwargs, says in [({"padding_mode": "reflect"}, "padding_mode='reflect'"),
                         ({"padding_mode": "circular"}, "padding_mode='circular'"), ({"groups": 2}, "groups=2")]:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, **kwargs), nn.Flatten(), nn.LazyLinear(2))
        with pytest.raises(ValueError, match=f"layer '0' is a Conv2d.*: it has {says}"):
            find_linear_layers(model, ["0"])


class PerImage(nn.Module):
    """A conv layer and a readout called on one unbatched ``(C, H, W)`` image at a time, or on the batch."""

    def __init__(self, height: int, batched: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.lin, self.batched = nn.Conv2d(2, 4, 3, padding=1), nn.Linear(4 * height * 6, 4), batched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batched:
            return self.lin(torch.tanh(self.conv(x)).flatten(1))
        return torch.stack([self.lin(torch.tanh(self.conv(img)).flatten()) for img in x])


def test_unbatched_conv_calls_give_the_batched_K() -> None:
    """Height 4 = C_out (the channel dim was once mistaken silently) and height 5; the readout has the same
    k as the conv, so the two share one Gram scratch."""
    for height in (4, 5):
        x = torch.randn(3, 2, height, 6, dtype=torch.float64)
        looped, batched = PerImage(height, False).double(), PerImage(height, True).double()
        ref = reference_K(batched, x, ["conv", "lin"])
        for model in (looped, batched):
            K = ptk_covariance(model, x, layers=["conv", "lin"])
            assert rel_err(K["conv"], ref["conv"]) < 1e-10 and rel_err(K["lin"], ref["lin"]) < 1e-10, height


def matrix_correlation_exact(A: list, B: list, method: str) -> float:
    """``rho(A, B)`` of two flattened matrices of ``Fraction`` entries, exact up to the final square root."""
    if method == "pearson":
        mean_a, mean_b = sum(A) / len(A), sum(B) / len(B)
        A, B = [a - mean_a for a in A], [b - mean_b for b in B]
    ab, aa, bb = sum(a * b for a, b in zip(A, B)), sum(a * a for a in A), sum(b * b for b in B)
    return float(ab) / (float(aa) * float(bb)) ** 0.5


def test_conv_nfa_k_by_k_route_equals_the_d_by_d_route(monkeypatch) -> None:
    """Conv layers (d = in·9 > k = out) are summarised from k x k sums taken over column blocks of W (several
    forced, the last shorter): the d x d route's values to 1e-9 relative in float64, also when W = 1 + σ·noise,
    and NaN where the d x d route gives NaN; likewise every record of a VGG measurement. At σ = 1e-7 the kernel
    alignment ``rho(W W^T, K)`` of both routes is as far from exact rational arithmetic (~1e-9 relative, the
    rounding of ``W W^T``'s entries near ``d``); it is checked against that exact value there."""
    import math
    from fractions import Fraction

    import diagnostics.output_space as output_space
    from diagnostics.nfa import nfa_summary

    g = torch.Generator().manual_seed(0)
    keys = ("uc_nfa", "c_nfa", "kernel_alignment", "rel_change")
    shapes = [((8, 4), 0.0, 1.0), ((16, 24), 0.0, 0.3), ((12, 7), 1.0, 1e-6), ((6, 5), 1.0, 1e-7)]
    for (out_c, in_c), base, sigma in shapes:
        monkeypatch.setattr(output_space, "COLUMN_BLOCK", 5 * out_c, raising=False)  # blocks of 5 columns
        W0 = (base + sigma * torch.randn(out_c, in_c, 3, 3, generator=g, dtype=torch.float64)).reshape(out_c, -1)
        W = W0 + sigma * torch.randn(W0.shape, generator=g, dtype=torch.float64)
        J = torch.randn(out_c, out_c, generator=g, dtype=torch.float64)
        K = J @ J.t() / out_c
        for method in ("pearson", "cosine"):
            d_by_d = nfa_summary(W, W0, K, method, keep_matrices=True)
            k_by_k = nfa_summary(W, W0, K, method, keep_matrices=False)
            assert k_by_k["nfm"] is None  # the k x k route
            for key in keys:
                if key == "kernel_alignment" and sigma < 1e-6:
                    Wf = [[Fraction(v) for v in row] for row in W.tolist()]
                    Kf = [Fraction(v) for v in K.flatten().tolist()]
                    A = [sum(a * b for a, b in zip(Wf[i], Wf[j])) for i in range(out_c) for j in range(out_c)]
                    exact = float(matrix_correlation_exact(A, Kf, method))
                    assert k_by_k[key] == pytest.approx(exact, rel=1e-8, abs=0), (out_c, in_c, sigma, method)
                    continue
                assert k_by_k[key] == pytest.approx(d_by_d[key], rel=1e-9, abs=0), (out_c, in_c, sigma, method, key)
            assert k_by_k["norms"] == pytest.approx(d_by_d["norms"], rel=1e-9, abs=0)
        nan_cases = 0
        for value in (0.5, 0.7, 1 / 3):  # a constant W: no Pearson correlation (unless rounding leaves one)
            W = torch.full((out_c, in_c * 9), value, dtype=torch.float64)
            if math.isnan(nfa_summary(W, W0, K, keep_matrices=True)["uc_nfa"]):
                nan_cases += 1
                assert math.isnan(nfa_summary(W, W0, K, keep_matrices=False)["uc_nfa"]), value
        assert nan_cases >= 1
    model = tiny_vgg(2)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    names = conv_layers(model)
    with NFAMonitor(model, layers=names) as mon:
        with torch.no_grad():  # away from W0: a C-NFA to compare
            for n in names:
                model.get_submodule(n).weight.add_(0.1 * torch.randn_like(model.get_submodule(n).weight))
        dense, small = mon.measure(x, keep_matrices=True), mon.measure(x)
    for n in names:
        for key in keys:
            assert getattr(small[n], key) == pytest.approx(getattr(dense[n], key), rel=1e-9, abs=0), (n, key)
        assert small[n].norms == pytest.approx(dense[n].norms, rel=1e-9, abs=0)


def test_vgg_sized_conv_summary_stays_small() -> None:
    """A 512 -> 512 3x3 conv (d = 4608): measure() on 2 images of 4x4 allocates well under 100 MB (a float64
    d x d term alone is 170 MB), no k x d float64 copy of W, and no more than its estimate."""
    from diagnostics.memory import estimate_memory
    from test_diag_robust import _peak_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512 * 16, 10))
    x = torch.randn(2, 512, 4, 4)
    mon = NFAMonitor(model, layers=["0"])
    mon.measure(x[:1])  # warm-up
    peak = _peak_bytes(lambda: mon.measure(x))
    assert peak < 40 * 10**6, peak
    assert peak <= estimate_memory(mon.adapters)["total"] + 2**20  # plus the passes over the tiny probe
