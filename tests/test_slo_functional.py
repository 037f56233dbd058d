"""The functional core: per-layer norms, coefficients, in-place rescaling."""

from __future__ import annotations

import math

import pytest
import torch

from slo_torch import layer_sq_norms, scale_layers_, slo_coefficients, slo_rescale_
from slo_torch.functional import rescale_updates_


def test_slo_rescale_sets_each_layer_norm_to_its_speed() -> None:
    torch.manual_seed(0)
    w1, b1, w2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    expected = [math.sqrt(float(w1.pow(2).sum() + b1.pow(2).sum())), float(w2.norm())]
    norms = slo_rescale_([[w1, b1], w2], [3.0, 0.5])
    assert norms.tolist() == pytest.approx(expected, rel=1e-14)
    assert math.sqrt(float(w1.pow(2).sum() + b1.pow(2).sum())) == pytest.approx(3.0, rel=1e-14)
    assert float(w2.norm()) == pytest.approx(0.5, rel=1e-14)


def test_zero_layer_stays_zero_and_eps() -> None:
    z = torch.zeros(3, 3)
    g = torch.full((4,), 2.0)  # norm 4
    slo_rescale_([z, g], torch.tensor([1.0, 1.0]), eps=1.0)
    assert torch.count_nonzero(z) == 0 and not torch.isnan(z).any()
    assert float(g.norm()) == pytest.approx(4.0 / 5.0)


def test_coefficients_are_speed_over_norm_and_one_for_zero_layers() -> None:
    norms = torch.tensor([0.0, 2.0, 4.0])
    c = slo_coefficients(norms, torch.tensor([5.0, 5.0, 1.0]), eps=0.0)
    assert c.tolist() == [1.0, 2.5, 0.25]


def test_coefficients_and_rescaling_read_no_values_on_the_host() -> None:
    # meta tensors have no values: any Python branch on a tensor (a host synchronisation) would raise
    norms = torch.empty(3, device="meta")
    c = slo_coefficients(norms, torch.empty(3, device="meta"), eps=0.5)
    assert c.shape == (3,) and c.is_meta
    tensors = [torch.empty(4, 3, device="meta"), torch.empty(4, device="meta"), torch.empty(2, device="meta")]
    index = torch.tensor([0, 0, 1], device="meta")
    sq = layer_sq_norms(tensors, index, 2)
    assert sq.shape == (2,) and sq.is_meta
    scale_layers_(tensors, index, c[:2])
    rescale_updates_(tensors, [torch.empty_like(t) for t in tensors], index, c[:2])


def test_mixed_dtypes_are_grouped() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(5, dtype=torch.float32), torch.randn(6, dtype=torch.float64),
               torch.randn(7, dtype=torch.bfloat16), torch.randn(3, dtype=torch.float64)]
    index = torch.tensor([0, 1, 0, 1])
    sq = layer_sq_norms(tensors, index, 2)
    assert sq.dtype == torch.float64
    ref0 = float(tensors[0].double().pow(2).sum() + tensors[2].double().pow(2).sum())
    ref1 = float(tensors[1].pow(2).sum() + tensors[3].pow(2).sum())
    assert sq.tolist() == pytest.approx([ref0, ref1], rel=1e-6)
    norms = slo_rescale_([[tensors[0], tensors[2]], [tensors[1], tensors[3]]], [1.0, 2.0])
    assert norms.tolist() == pytest.approx([math.sqrt(ref0), math.sqrt(ref1)], rel=1e-6)
    assert math.sqrt(float(tensors[1].pow(2).sum() + tensors[3].pow(2).sum())) == pytest.approx(2.0, rel=1e-12)


def test_sparse_gradients() -> None:
    emb = torch.nn.Embedding(6, 3, sparse=True).double()
    emb(torch.tensor([1, 1, 4])).sum().backward()
    dense = emb.weight.grad.to_dense()
    norms = slo_rescale_([[emb.weight.grad]], [2.0])
    assert float(norms[0]) == pytest.approx(float(dense.norm()), rel=1e-12)
    assert float(emb.weight.grad.to_dense().norm()) == pytest.approx(2.0, rel=1e-12)


def test_speed_count_must_match() -> None:
    with pytest.raises(ValueError, match="one per layer"):
        slo_rescale_([torch.ones(2), torch.ones(2)], [1.0])


def test_complex128_norms_are_accumulated_in_double() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(30, dtype=torch.complex128), torch.randn(7, dtype=torch.complex128)
    expected = math.sqrt(float(a.abs().pow(2).sum() + b.abs().pow(2).sum()))
    norms = slo_rescale_([[a, b]], [2.0])
    assert norms.dtype == torch.float64
    assert float(norms[0]) == pytest.approx(expected, rel=1e-15)
    assert math.sqrt(float(a.abs().pow(2).sum() + b.abs().pow(2).sum())) == pytest.approx(2.0, rel=1e-15)


def test_scaled_tensors_are_unscaled_before_squaring() -> None:
    # S g with S = 2**70: ||S g||^2 ~ 1e44 overflows float32, ||g||^2 does not
    torch.manual_seed(0)
    g = [torch.randn(1000), torch.randn(10)]
    scale = torch.tensor(2.0**70)
    sq = layer_sq_norms([t * scale for t in g], torch.tensor([0, 0]), 1, inv_scale=scale.double().reciprocal())
    assert sq.dtype == torch.float64
    assert float(sq[0]) == pytest.approx(sum(float(t.double().pow(2).sum()) for t in g), rel=1e-6)


def test_rescale_updates_moves_each_layer_by_its_step_size() -> None:
    torch.manual_seed(0)
    old = [torch.randn(shape, dtype=torch.float64) for shape in ((4, 3), (4,), (2,))]
    new = [t + torch.randn_like(t) for t in old]
    params = [t.clone() for t in new]
    torch._foreach_sub_(params, old)  # the deltas
    index = torch.tensor([0, 0, 1])
    k = slo_coefficients(layer_sq_norms(params, index, 2).sqrt(), torch.tensor([0.3, 2.0], dtype=torch.float64))
    rescale_updates_(params, old, index, k)
    moved = [p - o for p, o in zip(params, old)]
    assert math.sqrt(float(moved[0].pow(2).sum() + moved[1].pow(2).sum())) == pytest.approx(0.3, rel=1e-12)
    assert float(moved[2].norm()) == pytest.approx(2.0, rel=1e-12)
    torch.testing.assert_close(params[2], old[2] + k[1] * (new[2] - old[2]), rtol=0, atol=0)

