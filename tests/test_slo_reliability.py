"""SLOptimizer and attach() at the edges: tiny gradients, edited param groups, readouts, hooks, argument checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from slo_torch import SLOptimizer, attach, promote, promote_lowest, slo_rescale_


def _limited(form: str, base: torch.optim.Optimizer, model: nn.Module | None, speeds: Any, **kwargs: Any) -> Any:
    """``(optimizer to step, read-outs)`` for the wrapping and the ``attach`` forms."""
    if form == "wrap":
        opt = SLOptimizer(base, model=model, speeds=speeds, **kwargs)
        return opt, opt
    return base, attach(base, model, speeds, **kwargs)


def _layer_moves(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norm of each module's parameter change, in float64."""
    out: dict[str, float] = {}
    for n, p in model.named_parameters():
        layer = n.rsplit(".", 1)[0] if "." in n else ""
        out[layer] = out.get(layer, 0.0) + float((p.detach().double() - before[n].double()).pow(2).sum())
    return {k: math.sqrt(v) for k, v in out.items()}


@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_tiny_gradients_are_normalised_exactly(form: str) -> None:
    # a 12-layer linear stack, weights at init std 0.01: every layer's gradient norm is near 1e-30,
    # whose float32 square underflows
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16) for _ in range(12)])
    for layer in model:
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.zeros_(layer.bias)
    lr, C = 0.1, 1.0
    opt, slo = _limited(form, torch.optim.SGD(model.parameters(), lr=lr), model, {"*": C})
    model(torch.randn(8, 16)).pow(2).sum().backward()
    ref = {n.rsplit(".", 1)[0]: 0.0 for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        ref[n.rsplit(".", 1)[0]] += float(p.grad.double().pow(2).sum())
    assert sum(sq < 1e-38 for sq in ref.values()) >= 8  # squares below float32's normal range
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for layer, sq in ref.items():
        assert float(slo.last_grad_norms[layer]) == pytest.approx(math.sqrt(sq), rel=1e-6, abs=0.0)
    for layer, moved in _layer_moves(model, before).items():
        assert moved == pytest.approx(lr * C, rel=1e-5)


@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_tiny_updates_are_rescaled_exactly(form: str) -> None:
    # parameters and steps near 1e-30: the update's squared norm underflows float32
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-30)
    lr, C = 0.5, 2.0
    opt, slo = _limited(form, torch.optim.SGD(model.parameters(), lr=lr), model, {"*": C}, mode="update")
    (1e-30 * model(torch.randn(8, 16))).sum().backward()
    grad_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert 0 < grad_norm < 1e-25
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert float(slo.last_grad_norms[""]) == pytest.approx(grad_norm, rel=1e-6, abs=0.0)
    assert float(slo.last_update_norms[""]) == pytest.approx(lr * grad_norm, rel=1e-5, abs=0.0)
    assert _layer_moves(model, before)[""] == pytest.approx(lr * C, rel=1e-5)


@pytest.mark.parametrize("form", ["wrap", "attach"])
@pytest.mark.parametrize("mode", ["grad", "update"])
@pytest.mark.parametrize(("dtype", "scale", "C"), [(torch.float32, 1e-41, 1.0), (torch.float32, 1e-36, 1e4),
                                                   (torch.bfloat16, 1e-39, 1.0), (torch.float32, 1e37, 1e-3)])
def test_coefficients_beyond_float32_move_the_layer_by_its_speed(
    form: str, mode: str, dtype: torch.dtype, scale: float, C: float
) -> None:
    # C / ||g|| (or lr C / ||p_new - p_old||) above float32's max (subnormal gradients) or below its
    # normal range (huge ones): the step is still lr C, with no inf or NaN
    torch.manual_seed(0)
    model = nn.Linear(6, 5).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # p_new - p_old is exact at 0 (update mode: the subnormal SGD step)
            p.zero_()
    lr = 0.1
    opt, slo = _limited(form, torch.optim.SGD(model.parameters(), lr=lr), model, {"*": C}, mode=mode)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, dtype=torch.float64) * scale).to(dtype)
    grad_norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
    assert grad_norm > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert float(slo.last_grad_norms[""]) == pytest.approx(grad_norm, rel=1e-6, abs=0.0)
    assert _layer_moves(model, before)[""] == pytest.approx(lr * C, rel=1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_float32_layer_next_to_a_float64_one_gets_its_coefficient_exactly(mode: str) -> None:
    # norms and coefficients are float64 (one float64 layer), but the float32 layer multiplies in float32
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False).double())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    lr, C = 0.1, 1.0
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=lr), model=model, speeds={"*": C}, mode=mode)
    model[0].weight.grad = torch.full((3, 3), 1e-41)
    model[1].weight.grad = torch.full((3, 3), 1e-3, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    assert _layer_moves(model, before) == pytest.approx({"0": lr * C, "1": lr * C}, rel=1e-6)


def test_slo_rescale_of_subnormal_gradients_gives_norm_c() -> None:
    g = (torch.randn(7, dtype=torch.float64) * 1e-41).float()
    slo_rescale_([g], [1.0])
    assert float(g.double().norm()) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("form", ["wrap", "attach"])
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_a_parameter_replaced_in_its_group_is_speed_limited(form: str, mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    lr, C = 0.1, 1.0
    opt, slo = _limited(form, torch.optim.SGD(model.parameters(), lr=lr), model, {"*": C}, mode=mode)
    x = torch.randn(8, 4)
    model(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    model[0].weight = nn.Parameter(torch.randn(4, 4))  # a new tensor, in the old one's place
    opt.param_groups[0]["params"][0] = model[0].weight
    model(x).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    moves = _layer_moves(model, before)
    assert moves == pytest.approx({"0": lr * C, "1": lr * C}, rel=1e-5)
    grad_norm = math.sqrt(float(model[0].weight.grad.double().pow(2).sum() + model[0].bias.grad.double().pow(2).sum()))
    if mode == "update":  # grad mode rescales p.grad in place
        assert float(slo.last_grad_norms["0"]) == pytest.approx(grad_norm, rel=1e-6)


def _layer_grad_norms(model: nn.Module) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, p in model.named_parameters():
        out[n.rsplit(".", 1)[0]] = out.get(n.rsplit(".", 1)[0], 0.0) + float(p.grad.double().pow(2).sum())
    return {k: math.sqrt(v) for k, v in out.items()}


@pytest.mark.parametrize("change", ["set_speeds", "add_param_group"])
@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_readouts_keep_their_layer_names_when_the_limited_layers_change(form: str, change: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3))
    lr = 0.1
    params = list(model.parameters())
    base_params = params[2:] if change == "add_param_group" else params
    speeds = {"*": 1.0} if change == "add_param_group" else {"1": 1.0, "2": 1.0}
    opt, slo = _limited(form, torch.optim.SGD(base_params, lr=lr), model, speeds, mode="update")
    model(torch.randn(8, 4)).pow(2).sum().backward()
    truth = _layer_grad_norms(model)
    opt.step()
    assert set(slo.last_grad_norms) == {"1", "2"}
    if change == "set_speeds":
        (opt if form == "wrap" else slo.limiter).set_speeds({"0": 1.0, "1": 1.0, "2": 1.0})
    else:
        opt.add_param_group({"params": params[:2]})
    assert slo.layer_names == ["0", "1", "2"]
    for readout in (slo.last_grad_norms, slo.last_update_norms):
        assert set(readout) == {"1", "2"}
    assert {k: float(v) for k, v in slo.last_grad_norms.items()} == pytest.approx(
        {"1": truth["1"], "2": truth["2"]}, rel=1e-6)


@pytest.mark.parametrize(("pattern", "rank"), [
    ("[0-9]", (0, 0, -1)), ("1*", (0, 1, -1)), ("[!a]x", (0, 1, -1)), ("[]]", (0, 0, -1)), ("[!]x]y", (0, 1, -1)),
    ("a[b", (1, 3, 0)), ("layer.[0-9][0-9]", (0, 6, -2)), ("*.weight?", (0, 7, -2)), ("0", (1, 1, 0)),
])
def test_bracket_expressions_are_wildcards_not_literal_text(pattern: str, rank: tuple[int, int, int]) -> None:
    from fnmatch import fnmatchcase

    from slo_torch.layers import pattern_specificity

    assert pattern_specificity(pattern) == rank
    if pattern == "[]]":
        assert fnmatchcase("]", pattern) and not fnmatchcase("[]]", pattern)  # one character, as counted
    if pattern == "a[b":
        assert fnmatchcase("a[b", pattern)  # an unclosed "[" is literal


def test_a_glob_with_more_literal_text_beats_a_bracket_expression() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"[0-9]": 1.0, "1*": 2.0})
    assert opt.layer_speeds == {"0": 1.0, "1": 2.0}


@pytest.mark.parametrize("scope", ["instance", "global"])
@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_post_hooks_of_the_base_optimizer_see_the_rescaled_step(form: str, scope: str) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    lr, C = 0.01, 0.1
    base = torch.optim.Adam(model.parameters(), lr=lr)
    seen: list[dict[str, torch.Tensor]] = []

    def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:  # an EMA would read them here
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    handle = base.register_step_post_hook(record) if scope == "instance" else register_optimizer_step_post_hook(record)
    try:
        opt, _ = _limited(form, base, model, {"*": C}, mode="update")
        model(torch.randn(8, 4, dtype=torch.float64)).pow(2).sum().backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
    finally:
        handle.remove()
    assert _layer_moves(model, before) == pytest.approx({"0": lr * C, "1": lr * C}, rel=1e-9)
    assert seen and all(torch.equal(seen[-1][n], p) for n, p in model.named_parameters())


def test_post_hooks_of_an_unhooked_base_step_are_reported() -> None:
    class Replaced(torch.optim.SGD):
        pass

    model = nn.Linear(3, 2)
    base = Replaced(model.parameters(), lr=0.1)
    def plain_step(self: torch.optim.Optimizer, closure: Any = None) -> None:
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad, alpha=-group["lr"])

    Replaced.step = plain_step  # a step without torch's hook wrapper
    base.register_step_post_hook(lambda *args: None)
    opt = SLOptimizer(base, model=model, speeds={"*": 1.0}, mode="update")
    model(torch.randn(4, 3)).sum().backward()
    with pytest.warns(RuntimeWarning, match="register them on the SLOptimizer"):
        opt.step()


@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_a_group_speed_next_to_speeds_is_refused(form: str) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    groups = [{"params": model[0].parameters(), "speed": 3.0}, {"params": model[1].parameters()}]
    with pytest.raises(ValueError, match=r"Param group\(s\) \[0\] have a 'speed' key and speeds= is given too"):
        _limited(form, torch.optim.SGD(groups, lr=0.1), model, {"*": 1.0})
    opt, _ = _limited(form, torch.optim.SGD(model[0].parameters(), lr=0.1), model, {"*": 1.0})
    with pytest.raises(ValueError, match="'speed' key and speeds= is given too"):
        opt.add_param_group({"params": model[1].parameters(), "speed": 2.0})
        model(torch.ones(1, 2)).sum().backward()
        opt.step()  # attach() sees the optimizer's groups at its next step


@pytest.mark.parametrize("speeds", [{"0": 2.0, "*": 1.0}, [2.0, 1.0]])
def test_the_saved_speeds_are_a_copy(speeds: Any) -> None:
    import copy

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds=speeds)
    saved = opt.state_dict()["slo_speeds"]
    assert saved == speeds
    if isinstance(saved, dict):
        saved["0"] = 99.0
    else:
        saved[0] = 99.0
    assert opt.state_dict()["slo_speeds"] == speeds
    assert copy.deepcopy(opt).layer_speeds == {"0": 2.0, "1": 1.0}


def test_list_speeds_and_add_param_group_say_how_to_add_layers() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    opt = SLOptimizer(torch.optim.SGD(list(model[:2].parameters()), lr=0.1), model=model, speeds=[1.0, 2.0])
    how = r"set_speeds\(\{\.\.\.\}\) first, then add_param_group"
    with pytest.raises(ValueError, match=how):
        opt.add_param_group({"params": model[2].parameters()})
    with pytest.raises(ValueError, match=how):
        opt.set_speeds([1.0, 2.0, 3.0])
    opt.set_speeds({"0": 1.0, "1": 2.0, "2": 3.0})  # what the message says
    opt.add_param_group({"params": model[2].parameters()})
    assert opt.layer_speeds == {"0": 1.0, "1": 2.0, "2": 3.0}


def test_add_param_group_refuses_a_set_as_torch_does() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    plain = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(TypeError, match="ordered collections") as torch_error:
        plain.add_param_group({"params": set(model[1].parameters())})
    opt = SLOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model=model, speeds={"*": 1.0})
    with pytest.raises(TypeError) as error:
        opt.add_param_group({"params": set(model[1].parameters())})
    assert str(error.value) == str(torch_error.value)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(("call", "message"), [
    (lambda m: promote(m, "0", 1e-320), r"Invalid C for promote\('0'\): 1e-320; .*finite 1/C"),
    (lambda m: promote(m, "0", 0.0), r"Invalid C for promote\('0'\): 0.0"),
    (lambda m: promote(m, "0", float("inf")), r"Invalid speed for promote\('0'\): inf"),
    (lambda m: promote(m, 0, 2.0), r"promote\(\): layer must be a layer name"),
    (lambda m: promote_lowest(m, {"0": None, "1": 0.1}, 2.0), r"promote_lowest\(\): scores\['0'\] is None"),
    (lambda m: promote_lowest(m, {"0": "low", "1": 0.1}, 2.0), r"scores\['0'\] is 'low'"),
    (lambda m: promote_lowest(m, {"0": 0.5, "1": 0.1}, 1e-320), r"Invalid C for promote_lowest\(\): 1e-320"),
])
def test_promotion_arguments_are_checked_at_the_call(call: Any, message: str) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises((ValueError, TypeError), match=message):
        call(model)


def test_promote_lowest_takes_numpy_and_tensor_scores() -> None:
    import numpy as np

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert promote_lowest(model, {"0": np.float32(0.5), "1": torch.tensor(0.1)}, 4.0) == {"1": 4.0, "*": 0.25}
    assert promote_lowest(model, {"0": float("nan"), "1": 0.9}, 4.0) == {"1": 4.0, "*": 0.25}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1e20, 0.0])
def test_layer_norms_are_exact_at_any_scale(dtype: torch.dtype, scale: float) -> None:
    from slo_torch import layer_sq_norms, slo_rescale_

    if dtype == torch.float16 and scale not in (1e-3, 0.0):
        pytest.skip("outside float16's range")
    torch.manual_seed(0)
    tensors = [(torch.randn(n, dtype=torch.complex128 if dtype.is_complex else torch.float64) * scale).to(dtype)
               for n in (300, 7, 50, 1)]
    index = torch.tensor([0, 0, 1, 1])
    ref = [sum(float(t.to(torch.complex128 if dtype.is_complex else torch.float64).abs().pow(2).sum())
               for t in tensors[i:i + 2]) for i in (0, 2)]
    assert layer_sq_norms(tensors, index, 2).tolist() == pytest.approx(ref, rel=1e-6, abs=0.0)
    norms = slo_rescale_([tensors[:2], tensors[2:]], [1.0, 2.0])
    assert norms.tolist() == pytest.approx([math.sqrt(r) for r in ref], rel=1e-6, abs=0.0)
    if scale:
        after = [math.sqrt(sum(float(t.abs().double().pow(2).sum()) for t in pair))
                 for pair in (tensors[:2], tensors[2:])]
        assert after == pytest.approx([1.0, 2.0], rel=1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.complex64])
@pytest.mark.parametrize("form", ["wrap", "attach"])
def test_long_gradients_get_exact_norms(dtype: torch.dtype, form: str) -> None:
    # float32 accumulation of 65536 equal squares one after another loses ~5e-5 of the norm, of 1M random ones ~1e-5
    from slo_torch import layer_sq_norms

    torch.manual_seed(0)
    wide = torch.complex128 if dtype.is_complex else torch.float64
    tensors = [torch.full((256, 256), 1 / 3, dtype=dtype), torch.randn(1 << 20, dtype=wide).to(dtype)]
    ref = [float(t.to(wide).abs().pow(2).sum()) for t in tensors]
    assert layer_sq_norms(tensors, torch.tensor([0, 1]), 2).tolist() == pytest.approx(ref, rel=2e-6, abs=0.0)
    model = nn.Linear(256, 256, bias=False).to(dtype)
    lr, C = 0.1, 1.0
    opt, slo = _limited(form, torch.optim.SGD(model.parameters(), lr=lr), model, {"*": C})
    model.weight.grad = tensors[0].clone()
    opt.step()
    assert float(slo.last_grad_norms[""]) == pytest.approx(math.sqrt(ref[0]), rel=1e-6, abs=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e15])
def test_norms_of_many_equal_tensors_match_one_at_a_time_and_float64(dtype: torch.dtype, scale: float) -> None:
    # equal sizes of 2 to 64 rows of 512 entries take one stacked kernel call; mixed with other sizes
    from slo_torch import layer_sq_norms

    if dtype == torch.float16 and scale != 1.0:
        pytest.skip("outside float16's range")
    torch.manual_seed(0)
    sizes = (1024, 1024, 4096, 300, 4096, 4096, 32768, 32768, 33280, 513, 1024)
    tensors = [(torch.randn(n, dtype=torch.float64) * scale).to(dtype).view(-1, 4 if n % 4 == 0 else 1) for n in sizes]
    tensors[5] = tensors[5] * 0  # a zero tensor among equal ones
    index = torch.arange(len(sizes))
    together = layer_sq_norms(tensors, index, len(sizes))
    alone = torch.cat([layer_sq_norms([t], torch.tensor([0]), 1) for t in tensors])
    ref = torch.stack([t.double().pow(2).sum() for t in tensors])
    assert together.tolist() == pytest.approx(alone.tolist(), rel=1e-14, abs=0.0)
    assert together.tolist() == pytest.approx(ref.tolist(), rel=1e-6, abs=0.0)


def test_norm_of_a_sparse_gradient_without_entries_is_zero() -> None:
    # the long-tensor path of the CPU norms: a sparse tensor with no stored values, alone and beside others
    from slo_torch import layer_sq_norms

    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0), (1000,))
    assert layer_sq_norms([empty], torch.tensor([0]), 1).tolist() == [0.0]
    full = torch.ones(1024)
    assert layer_sq_norms([empty, full], torch.tensor([0, 1]), 2).tolist() == pytest.approx([0.0, 1024.0], rel=1e-6)
