"""Which tensors form a layer, and which speed each layer gets.

A *layer* is a module's own parameters (``module.parameters(recurse=False)``: weight and bias
together), named by its ``model.named_modules()`` name; with ``per_tensor=True`` every parameter is
its own layer, named by its ``model.named_parameters()`` name. A parameter shared by several modules
(tied weights) belongs to the first module that owns it. The tensors of a parametrization
(``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``, ...) live in
``<module>.parametrizations.<name>``; they belong to ``<module>``, the module that owns the
parametrization. The adapter tensors of a ``peft`` tuner layer (LoRA's ``<module>.lora_A.<adapter>``,
``<module>.lora_B.<adapter>``, DoRA's magnitude, the layers of IA³, LoHa, ...) belong to ``<module>``,
the wrapped module (:func:`adapter_owners`): they form one layer named as the wrapper, so a speed
bounds the joint update of ``A`` and ``B``: ``||(dA_a, dB_a)_a||_F = lr·C`` in update mode. Only the
active adapters get gradients; the frozen base layer keeps its own name (``<wrapper>.base_layer``).
``peft`` is never imported: a model holds peft layers only if the program imported peft, so they are
recognised through ``sys.modules``.

Speeds are given as

* a dict of :func:`fnmatch.fnmatchcase` patterns over layer names; the most specific matching pattern
  wins (see :func:`pattern_specificity`), ``"*"`` is the default, a ``None`` value exempts layers;
* a list in layer order (``None`` entries leave that layer untouched);
* ``None``: each tensor of a parameter group with a ``"speed"`` key is a layer of that speed.

Layers that get no speed are left untouched.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

__all__ = ["Layer", "resolve_layers", "promote", "promote_lowest", "pattern_specificity",
           "normalize_speeds", "unwrap_model", "check_model", "check_speed", "adapter_owners", "owner_of"]


SpeedSpec = Mapping[str, float] | Sequence[float | None] | None


@dataclass(frozen=True)
class Layer:
    """One speed-limited unit: ``name``, its tensors ``params`` (model order) and its ``speed``."""

    name: str
    params: tuple[torch.Tensor, ...]
    speed: float | None


def check_model(model: object) -> None:
    """``TypeError`` unless ``model`` is an ``nn.Module`` (or ``None``)."""
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be the nn.Module that owns the optimized parameters (model=model), got "
            f"{type(model).__name__}"
        )


def check_speed(speed: object, where: str) -> float:
    """Return ``speed`` as a float; ``ValueError`` unless it is a finite real number ``>= 0``.

    Python and NumPy numbers and one-element tensors are accepted.
    """
    if isinstance(speed, torch.Tensor):
        if speed.numel() != 1:
            raise ValueError(
                f"Invalid speed for {where}: a tensor of shape {tuple(speed.shape)}; a speed is a number "
                "or a one-element tensor"
            )
        speed = speed.item()
    if isinstance(speed, bool) or not isinstance(speed, numbers.Real):
        raise ValueError(f"Invalid speed for {where}: {speed!r}; speeds must be finite numbers >= 0")
    speed = float(speed)
    if not math.isfinite(speed) or speed < 0:
        raise ValueError(f"Invalid speed for {where}: {speed}; speeds must be finite numbers >= 0")
    return speed


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``DistributedDataParallel``/``DataParallel``/``torch.compile`` wrappers (their name prefixes)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def normalize_speeds(speeds: SpeedSpec) -> SpeedSpec:
    """A speed specification with every value a Python float (or ``None``), validated by :func:`check_speed`.

    Dict keys must be strings; a list stays in layer order; ``None`` (speeds in the param groups) stays.
    """
    if speeds is None:
        return None
    if isinstance(speeds, Mapping):
        out: dict[str, float | None] = {}
        for pattern, value in speeds.items():
            if not isinstance(pattern, str):
                raise ValueError(f"speed patterns must be strings, got {pattern!r}")
            out[pattern] = None if value is None else check_speed(value, f"pattern {pattern!r}")
        return out
    if isinstance(speeds, (str, bytes, torch.Tensor)) or not isinstance(speeds, Sequence):
        raise ValueError(
            f"speeds must be a dict of layer-name patterns, a list in layer order, or None "
            f"(param groups with a 'speed' key); got {type(speeds).__name__}"
        )
    return [None if v is None else check_speed(v, f"speeds[{i}]") for i, v in enumerate(speeds)]


def pattern_specificity(pattern: str) -> tuple[int, int, int]:
    """Rank of a pattern; the larger tuple is the more specific.

    ``(exact, literal characters, -wildcards)``: a name without wildcards (``*``, ``?``, a bracket
    expression ``[...]``) beats any glob; among globs, more literal text wins, then fewer wildcards.
    ``"*"`` is therefore the least specific. A bracket expression is one wildcard, not literal text; a
    ``[`` without its ``]`` is a literal character, as in :func:`fnmatch.fnmatchcase`.
    """
    wildcards = literal = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            wildcards += 1
        elif c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j = j + 1 if j < n and pattern[j] == "]" else j  # a "]" first in the set is a member
            end = pattern.find("]", j)
            if end < 0:
                literal += 1
            else:
                wildcards += 1
                i = end + 1
        else:
            literal += 1
    return (int(wildcards == 0), literal, -wildcards)


_WRAPPER_NAMES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def clean_name(name: str) -> str:
    """``name`` without the components that FSDP1 and activation-checkpoint wrappers insert."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)


def _parametrization_owner(name: str, parametrized: set[str]) -> str:
    """``"0"`` for ``"0.parametrizations.weight"`` (and anything below it) when ``"0"`` is parametrized."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part == "parametrizations" and ".".join(parts[:i]) in parametrized:
            return ".".join(parts[:i])
    return name


def adapter_owners(model: nn.Module) -> dict[str, str]:
    """``{name of an adapter submodule: name of its tuner layer}`` over ``model``'s peft tuner layers
    (``model.named_modules()`` names; ``{}`` without peft)."""
    utils = sys.modules.get("peft.tuners.tuners_utils")
    tuner = getattr(utils, "BaseTunerLayer", None)
    if tuner is None:
        return {}
    owners = {}
    for name, module in model.named_modules():
        if isinstance(module, tuner):
            for attr in module.adapter_layer_names:
                if isinstance(getattr(module, attr, None), nn.Module):
                    owners[f"{name}.{attr}" if name else attr] = name
    return owners


def owner_of(name: str, owners: dict[str, str]) -> str:
    """The tuner layer owning module ``name`` (an adapter submodule or anything below it), else ``name``."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        owner = owners.get(".".join(parts[:i]))
        if owner is not None:
            return owner
    return name


def _named_owners(model: nn.Module, per_tensor: bool) -> dict[int, tuple[str, str]]:
    """``id(param) -> (layer name, module name)`` in model order, first owner wins.

    Parameters of a parametrization belong to the module that owns it, the adapter parameters of a
    ``peft`` tuner layer to the tuner layer (:func:`adapter_owners`).
    """
    owners: dict[int, tuple[str, str]] = {}
    parametrized = {clean_name(n) for n, m in model.named_modules() if is_parametrized(m)}
    adapters = {clean_name(sub): clean_name(owner) for sub, owner in adapter_owners(model).items()}
    for mod_name, module in model.named_modules():
        mod_name = clean_name(mod_name)
        owner = _parametrization_owner(mod_name, parametrized) if parametrized else mod_name
        if adapters:
            owner = owner_of(owner, adapters)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) not in owners:
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                owners[id(p)] = (full if per_tensor else owner, owner)
    return owners


def _match_dict(
    names: list[str], aliases: dict[str, str], speeds: Mapping[str, object], known: dict[str, str]
) -> dict[str, float | None]:
    """Resolve a pattern dict to ``{layer name: speed}`` (most specific pattern wins; ``None``: no limit)."""
    checked: Mapping[str, float | None] = normalize_speeds(speeds)  # type: ignore[assignment]
    out: dict[str, float | None] = {}
    for name in names:
        candidates = [
            pat for pat in checked if fnmatchcase(name, pat) or fnmatchcase(aliases.get(name, name), pat)
        ]
        if not candidates:
            continue
        ranked = sorted(candidates, key=pattern_specificity, reverse=True)
        if len(ranked) > 1 and pattern_specificity(ranked[0]) == pattern_specificity(ranked[1]):
            raise ValueError(
                f"Layer {name!r} is matched equally specifically by patterns {ranked[0]!r} and "
                f"{ranked[1]!r}; add an exact entry for {name!r}"
            )
        out[name] = checked[ranked[0]]
    # a pattern must name some layer of the model (it may be outside this optimizer, e.g. added later)
    unknown = [pat for pat in checked if pat != "*" and not any(
        fnmatchcase(n, pat) or fnmatchcase(m, pat) for n, m in known.items())]
    if unknown:
        raise ValueError(
            f"Speed pattern(s) {unknown} match no layer. Layers (modules with their own "
            f"parameters) are: {list(known)}"
        )
    return out


def resolve_layers(
    model: nn.Module | None,
    speeds: SpeedSpec,
    params: Iterable[torch.Tensor] | Sequence[Mapping[str, object]] | None = None,
    per_tensor: bool = False,
) -> list[Layer]:
    """Group ``params`` into layers of ``model`` and give each its speed ``C_l``.

    ``params`` are the tensors to limit (default: all of ``model``'s parameters), or parameter groups
    (dicts with ``"params"``; needed when ``speeds`` is ``None`` and the groups carry ``"speed"``).
    Returns every layer in model order, ``speed=None`` where no speed applies.
    Raises ``ValueError`` for a parameter that is not in ``model``, a pattern that matches no layer,
    a list of the wrong length, a negative/NaN/inf speed, or a group ``"speed"`` key next to ``speeds``.
    """
    check_model(model)
    groups = _as_groups(model, params)
    if speeds is None:
        return _layers_from_groups(model, groups)
    with_speed = [gi for gi, group in enumerate(groups) if "speed" in group]
    if with_speed:
        raise ValueError(
            f"Param group(s) {with_speed} have a 'speed' key and speeds= is given too; speeds come from one "
            "place: drop the groups' 'speed' keys, or pass speeds=None to use them"
        )
    if model is None:
        raise ValueError("model is required to resolve speeds by layer name; pass model=...")
    model = unwrap_model(model)
    owners = _named_owners(model, per_tensor)
    by_layer, module_of = _params_by_layer(groups, owners)
    order = {name: i for i, name in enumerate(dict.fromkeys(n for n, _ in owners.values()))}
    names = sorted(by_layer, key=order.__getitem__)
    if isinstance(speeds, Mapping):
        known = dict(owners.values())
        resolved = _match_dict(names, module_of, speeds, known)
        return [Layer(n, tuple(by_layer[n]), resolved.get(n)) for n in names]
    speeds = normalize_speeds(speeds)
    if len(speeds) != len(names):
        raise ValueError(
            f"speeds list has {len(speeds)} entries but there are {len(names)} layers: {names}. A list gives the "
            "speeds of the optimizer's layers as they are; to add param groups later, give the speeds as a dict "
            "of layer names or patterns ({name: C} or {'*': C}): set_speeds({...}) first, then add_param_group"
        )
    return [
        Layer(n, tuple(by_layer[n]), s) for n, s in zip(names, speeds)  # type: ignore[arg-type]
    ]


def _params_by_layer(
    groups: list[Mapping[str, object]], owners: dict[int, tuple[str, str]]
) -> tuple[dict[str, list[torch.Tensor]], dict[str, str]]:
    """``{layer name: its tensors among the groups}`` and ``{layer name: module name}``; ``ValueError``
    for a tensor that ``owners`` (:func:`_named_owners`) does not know."""
    by_layer: dict[str, list[torch.Tensor]] = {}
    module_of: dict[str, str] = {}
    seen: set[int] = set()
    missing = 0
    for group in groups:
        for p in group["params"]:  # type: ignore[union-attr]
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) not in owners:
                missing += 1
                continue
            layer, mod_name = owners[id(p)]
            by_layer.setdefault(layer, []).append(p)
            module_of[layer] = mod_name
    if missing:
        raise ValueError(
            f"{missing} optimized parameter(s) are not parameters of the given model; pass the model "
            "that owns every parameter of the optimizer (model=...)"
        )
    return by_layer, module_of


def _as_groups(
    model: nn.Module | None, params: Iterable[torch.Tensor] | Sequence[Mapping[str, object]] | None
) -> list[Mapping[str, object]]:
    if params is None:
        if model is None:
            raise ValueError("pass model=... or params=...")
        return [{"params": list(model.parameters())}]
    params = list(params)
    if params and isinstance(params[0], Mapping):
        return [dict(g, params=list(g["params"])) for g in params]  # type: ignore[arg-type]
    return [{"params": params}]


def _layers_from_groups(model: nn.Module | None, groups: list[Mapping[str, object]]) -> list[Layer]:
    """Each tensor of a group with a ``"speed"`` key is a layer named by its parameter name."""
    names: dict[int, str] = {}
    if model is not None:
        names = {id(p): clean_name(n) for n, p in unwrap_model(model).named_parameters()}
    if not any(group.get("speed") is not None for group in groups):
        raise ValueError(
            "No speeds given: pass speeds={pattern: C, ...} (or a list in layer order), or put a "
            "'speed' key in the optimizer's param groups"
        )
    layers = []
    for gi, group in enumerate(groups):
        speed = group.get("speed")
        if speed is not None:
            speed = check_speed(speed, f"param group {gi}")
        for pi, p in enumerate(group["params"]):  # type: ignore[union-attr]
            if model is not None and id(p) not in names:
                raise ValueError(
                    f"Parameter {pi} of param group {gi} is not a parameter of the given model; pass the "
                    "model that owns every parameter of the optimizer (model=...)"
                )
            layers.append(Layer(names.get(id(p), f"group{gi}.{pi}"), (p,), speed))
    return layers


def _promotion_speed(C: object, where: str) -> float:
    """``C`` as a float; ``ValueError`` naming ``where`` unless it is finite, > 0, with a finite ``1/C``."""
    C = check_speed(C, where)
    if C == 0 or not math.isfinite(1.0 / C):
        raise ValueError(
            f"Invalid C for {where}: {C!r}; promotion needs C > 0 with a finite 1/C (the other layers' speed)"
        )
    return C


def promote(model: nn.Module, layer: str, C: float) -> dict[str, float]:
    """Speeds that promote one layer and throttle the rest: ``{layer: C, "*": 1/C}``.

    The paper's recipe (e.g. ``C = 500``: the layer moves at 500, every other layer at 0.002).
    ``layer`` must name a module of ``model`` with its own parameters, ``C`` must be finite and > 0
    with a finite ``1/C``.
    """
    check_model(model)
    if not isinstance(layer, str):
        raise TypeError(f"promote(): layer must be a layer name (a str), got {layer!r}")
    C = _promotion_speed(C, f"promote({layer!r})")
    model = unwrap_model(model)
    names = list(dict.fromkeys(n for n, _ in _named_owners(model, per_tensor=False).values()))
    if layer not in names:
        raise ValueError(f"Unknown layer {layer!r}; layers with their own parameters are: {names}")
    return {layer: C, "*": 1.0 / C}


def promote_lowest(model: nn.Module, scores: Mapping[str, float], C: float) -> dict[str, float]:
    """``promote(model, argmin_l scores[l], C)``: promote the layer with the lowest score.

    The paper's prototype promotes the layer whose current NFA correlation is lowest; pass e.g.
    ``{name: record.c_nfa for name, record in monitor.measure(X).items()}``. NaN scores are ignored.
    """
    _promotion_speed(C, "promote_lowest()")
    values = {}
    for name, v in scores.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(
                f"promote_lowest(): scores[{name!r}] is {v!r}; scores must be numbers (NaN leaves a layer out)"
            )
        values[name] = float(v)
    finite = {name: v for name, v in values.items() if not math.isnan(v)}
    if not finite:
        raise ValueError("promote_lowest() needs at least one non-NaN score, e.g. {layer name: NFA correlation}")
    return promote(model, min(finite, key=finite.__getitem__), C)
