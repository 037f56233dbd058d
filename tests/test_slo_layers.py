"""Layer resolution, speeds, promote() and construction-time validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from slo_torch import SLOptimizer, attach, promote, promote_lowest, resolve_layers
from slo_torch.layers import pattern_specificity


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.layers = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.head = nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


NAMES = ["embed", "layers.0", "layers.1", "head"]


def speeds_of(model: nn.Module, speeds, **kw) -> dict[str, float | None]:
    return {layer.name: layer.speed for layer in resolve_layers(model, speeds, **kw)}


def test_layers_are_modules_own_parameters_in_model_order() -> None:
    model = Net()
    layers = resolve_layers(model, {"*": 1.0})
    assert [layer.name for layer in layers] == NAMES
    assert layers[0].params == (model.embed.weight, model.embed.bias)
    assert layers[3].params == (model.head.weight,)


def test_most_specific_pattern_wins() -> None:
    got = speeds_of(Net(), {"*": 1.0, "layers.*": 2.0, "layers.1": 3.0, "*.0": 4.0})
    # exact beats glob; "layers.*" (7 literal chars) beats "*.0" (2) for layers.0
    assert got == {"embed": 1.0, "layers.0": 2.0, "layers.1": 3.0, "head": 1.0}
    assert pattern_specificity("layers.1") > pattern_specificity("layers.*") > pattern_specificity("*")


def test_layers_without_speed_are_untouched() -> None:
    assert speeds_of(Net(), {"head": 5.0}) == {"embed": None, "layers.0": None, "layers.1": None, "head": 5.0}
    # a None value exempts the matching layers from the default
    assert speeds_of(Net(), {"*": 1.0, "layers.*": None}) == {"embed": 1.0, "layers.0": None, "layers.1": None, "head": 1.0}


def test_equally_specific_patterns_are_rejected() -> None:
    with pytest.raises(ValueError, match="equally specifically"):
        speeds_of(Net(), {"layers.?": 1.0, "layer?.0": 2.0})


def test_list_speeds_in_layer_order() -> None:
    assert speeds_of(Net(), [1.0, None, 2.0, 3.0]) == {"embed": 1.0, "layers.0": None, "layers.1": 2.0, "head": 3.0}
    with pytest.raises(ValueError, match="4 layers"):
        speeds_of(Net(), [1.0, 2.0])


def test_per_tensor_layers() -> None:
    got = speeds_of(Net(), {"*": 1.0, "*.bias": 0.5, "head": 2.0}, per_tensor=True)
    assert got["embed.weight"] == 1.0 and got["embed.bias"] == 0.5 and got["head.weight"] == 2.0
    assert len(got) == 7


def test_tied_parameter_belongs_to_first_owner() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    layers = resolve_layers(model, {"*": 1.0})
    assert [layer.name for layer in layers] == ["0"]


def test_ddp_like_wrappers_are_unwrapped() -> None:
    model = Net()
    wrapped = torch.compile(model, backend="eager")
    assert [layer.name for layer in resolve_layers(wrapped, {"*": 1.0})] == NAMES


def test_promote() -> None:
    model = Net()
    assert promote(model, "layers.0", 500.0) == {"layers.0": 500.0, "*": 1 / 500.0}
    assert speeds_of(model, promote(model, "embed", 4.0)) == {"embed": 4.0, "layers.0": 0.25, "layers.1": 0.25, "head": 0.25}
    with pytest.raises(ValueError, match="layers.0"):
        promote(model, "layers", 500.0)  # a container without own parameters; the message lists layers
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            promote(model, "embed", bad)


def test_unknown_pattern_lists_layers() -> None:
    model = Net()
    with pytest.raises(ValueError, match=r"match no layer.*'embed', 'layers.0', 'layers.1', 'head'"):
        SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"layer.0": 1.0})


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "fast", True])
def test_bad_speed_values(bad) -> None:
    model = Net()
    with pytest.raises(ValueError, match="speed"):
        SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"embed": bad})


def test_foreign_parameters_rejected() -> None:
    model, other = Net(), nn.Linear(2, 2)
    opt = torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the given model"):
        SLOptimizer(opt, model=model, speeds={"*": 1.0})
    with pytest.raises(ValueError, match="not parameters of the given model"):
        attach(opt, model, {"*": 1.0})


def test_wrapping_twice_rejected() -> None:
    model = Net()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"*": 1.0})
    with pytest.raises(ValueError, match="already an SLOptimizer"):
        SLOptimizer(opt, model=model, speeds={"*": 1.0})
    with pytest.raises(ValueError, match="already an SLOptimizer"):
        attach(opt, model, {"*": 1.0})


def test_bad_mode_eps_nonfinite_choice() -> None:
    model = Net()
    make = lambda **kw: SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"*": 1.0}, **kw)
    with pytest.raises(ValueError, match=r"Unknown mode 'grads'.*\('auto', 'grad', 'update'\)"):
        make(mode="grads")
    with pytest.raises(ValueError, match="eps"):
        make(slo_eps=-1.0)
    with pytest.raises(ValueError, match=r"'skip', 'raise'"):
        make(on_nonfinite="ignore")


def test_constructor_argument_errors() -> None:
    model = Net()
    with pytest.raises(TypeError, match="base_optimizer"):
        SLOptimizer(model.parameters(), model=model, speeds={"*": 1.0})
    with pytest.raises(TypeError, match="not both"):
        SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), base_optimizer=torch.optim.SGD, model=model, speeds={"*": 1.0})
    with pytest.raises(ValueError, match="No speeds"):
        SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model)


def test_speed_key_in_param_groups() -> None:
    model = Net()
    groups = [{"params": model.embed.parameters(), "speed": 3.0}, {"params": model.head.parameters()},
              {"params": list(model.layers.parameters()), "speed": None}]
    opt = SLOptimizer(groups, base_optimizer=torch.optim.SGD, model=model, lr=0.1)
    assert opt.layer_speeds == {"embed.weight": 3.0, "embed.bias": 3.0}
    with pytest.raises(ValueError, match="speed"):
        SLOptimizer([{"params": model.parameters(), "speed": -2.0}], base_optimizer=torch.optim.SGD, model=model, lr=0.1)


def test_promote_lowest_and_set_speeds() -> None:
    model = Net()
    speeds = promote_lowest(model, {"embed": 0.9, "layers.0": 0.2, "layers.1": float("nan"), "head": 0.5}, 10.0)
    assert speeds == {"layers.0": 10.0, "*": 0.1}
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"*": 1.0})
    opt.set_speeds(speeds)
    assert opt.layer_speeds == {"embed": 0.1, "layers.0": 10.0, "layers.1": 0.1, "head": 0.1}
    with pytest.raises(ValueError, match="match no layer"):
        opt.set_speeds({"nope": 1.0})
    assert opt.layer_speeds["layers.0"] == 10.0  # unchanged after a rejected update
    with pytest.raises(ValueError, match="non-NaN"):
        promote_lowest(model, {"embed": float("nan")}, 10.0)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal", "custom"])
def test_parametrized_tensors_belong_to_the_owning_module(kind: str) -> None:
    from torch.nn.utils import parametrizations, parametrize

    class Scale(nn.Module):  # a parametrization with a parameter of its own
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.tensor(2.0))

        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return self.s * w

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    register = {
        "weight_norm": lambda m: parametrizations.weight_norm(m),
        "spectral_norm": lambda m: parametrizations.spectral_norm(m),
        "orthogonal": lambda m: parametrizations.orthogonal(m),
        "custom": lambda m: parametrize.register_parametrization(m, "weight", Scale().double()),
    }[kind]
    register(model[0])
    owned = list(model[0].parameters())  # bias plus the parametrization's tensors
    assert len(owned) >= 2
    layers = resolve_layers(model, {"*": 1.0})
    assert [layer.name for layer in layers] == ["0", "2"]
    assert {id(p) for p in layers[0].params} == {id(p) for p in owned}
    speeds = promote(model, "0", 10.0)
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model=model, speeds=speeds)
    assert opt.layer_speeds == {"0": 10.0, "2": 0.1}
    before = [p.detach().clone() for p in owned]
    model(torch.randn(8, 4, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    moved = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(owned, before)))
    assert moved == pytest.approx(0.01 * 10.0, rel=1e-10)  # the whole layer, weight included


@pytest.mark.parametrize("speed", [np.float32(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2.0])],
                         ids=["np.float32", "np.int64", "0-dim tensor", "1-element tensor"])
def test_numpy_and_one_element_tensor_speeds(speed) -> None:
    model = Net()
    opt = SLOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model=model, speeds={"embed": speed, "*": 1.0})
    assert opt.layer_speeds["embed"] == 2.0 and type(opt.layer_speeds["embed"]) is float
    opt.set_speeds([speed, None, 1.0, speed])
    assert opt.layer_speeds == {"embed": 2.0, "layers.1": 1.0, "head": 2.0}
    assert promote(model, "head", speed) == {"head": 2.0, "*": 0.5}


def test_bad_speed_and_model_types_say_what_was_expected() -> None:
    model = Net()
    sgd = lambda: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(2,\); a speed is a number or a one-element tensor"):
        SLOptimizer(sgd(), model=model, speeds={"*": torch.tensor([1.0, 2.0])})
    for bad in (model.parameters(), "x"):
        with pytest.raises(TypeError, match="model must be the nn.Module that owns the optimized parameters"):
            SLOptimizer(sgd(), model=bad, speeds={"*": 1.0})
        with pytest.raises(TypeError, match="model must be the nn.Module"):
            attach(sgd(), bad, {"*": 1.0})
        with pytest.raises(TypeError, match="model must be the nn.Module"):
            promote(bad, "embed", 2.0)
