"""Chain-monomial task: NFA correlations, feature quality and test error under SGD, small init and SLO.

Target ``f*(x) = Σ_{i=1}^{r} x_i x_{i+1}`` on ``x ~ N(0, I_d)``, MSE loss, bias-free ReLU MLP. Runs, each
over several seeds: standard-init SGD, small-init SGD (all weights scaled at init), standard-init SLO
(one layer promoted, by default the first: speed ``C``, the others ``1/C``). Every ``eval_every`` steps it
records each layer's UC-NFA and C-NFA (``NFAMonitor``, exact ``K`` on a probe of training points), the
first-layer feature quality ``ρ(W_1^T W_1, EGOP*)`` and the test MSE. ``--promote-layer`` names the promoted
layer (``"0"``, ``"2"``, ... ``str(2 * depth)``, the readout); with ``--base-optimizer adamw`` all three runs
use AdamW (lr ``adamw_lr``) and SLO wraps AdamW (its default mode resolves to ``"update"``: the update, not
the gradient, is rescaled to norm ``lr·C_l``).

    python examples/chain_monomial.py --preset default --out results/chain_monomial
    python examples/chain_monomial.py --preset default --promote-layer 2 --out results/chain_monomial_layer2
    python examples/chain_monomial.py --preset default --base-optimizer adamw --out results/chain_monomial_adamw

Writes ``metrics.csv``, ``results.md`` and PNG figures to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from diagnostics import NFAMonitor, egop, feature_quality, nfm, plot_matrices, plot_nfa_curves, plot_scalar_curves
from diagnostics.datasets import chain_monomial, chain_monomial_data
from diagnostics.experiments import bias_free_mlp, command_line, eval_schedule, finish_run, markdown_table
from diagnostics.experiments import mean_std, mean_std_table, mse, nonnegative_int, parse_checked, positive_float
from diagnostics.experiments import positive_int, preset_parser, preset_settings, scale_init_, set_seed, settings_table
from diagnostics.experiments import train_mse, write_csv
from slo_torch import SLOptimizer, promote


@dataclass(frozen=True)
class Settings:
    d: int = 20
    r: int = 3
    n_train: int = 1000
    n_test: int = 2000
    width: int = 256
    depth: int = 2  # hidden layers
    steps: int = 5000
    batch: int = 128
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_every: int = 250
    probe: int = 500  # training points on which K is computed
    egop_samples: int = 20000
    sgd_lr: float = 0.05
    small_init: float = 0.1
    slo_lr: float = 1e-3
    slo_C: float = 500.0
    promote_layer: str = "0"  # the layer SLO moves at speed C (the others at 1/C)
    base_optimizer: str = "sgd"  # "sgd" or "adamw": the optimizer of all three runs (SLO wraps it)
    adamw_lr: float = 1e-3  # learning rate of the AdamW and small-init AdamW runs (torch's default)


PRESETS = {
    "smoke": Settings(d=8, n_train=256, n_test=256, width=32, steps=300, batch=64, seeds=(0,), eval_every=100,
                      probe=128, egop_samples=4096),
    "default": Settings(),
    "paper": Settings(seeds=(0, 1, 2, 3, 4), eval_every=100),
}


BASE_OPTIMIZERS = ("sgd", "adamw")


def linear_layers(depth: int) -> list[str]:
    """Names of the linear layers of ``bias_free_mlp(..., depth, ...)``: ``"0", "2", ..., str(2 * depth)``."""
    return [str(2 * i) for i in range(depth + 1)]


def layer_names(depth: int) -> dict[str, str]:
    """Panel names of the linear layers: ``layer 0 (first)``, ..., ``layer 2·depth (readout)``."""
    ordinals = ("first", "second", "third", "fourth", "fifth")
    names = {n: f"layer {n} ({ordinals[i] if i < len(ordinals) else f'hidden {i + 1}'})"
             for i, n in enumerate(linear_layers(depth)[:-1])}
    return {**names, str(2 * depth): f"layer {2 * depth} (readout)"}


def runs(s: Settings) -> dict[str, dict[str, Any]]:
    """The compared runs: optimizer, learning rate, init scale and (SLO) speed of the promoted layer. The first
    run is named after the base optimizer (``sgd`` or ``adamw``)."""
    lr = s.sgd_lr if s.base_optimizer == "sgd" else s.adamw_lr
    return {
        s.base_optimizer: dict(optimizer=s.base_optimizer, lr=lr, init_scale=1.0, C=None),
        "small_init": dict(optimizer=s.base_optimizer, lr=lr, init_scale=s.small_init, C=None),
        "slo": dict(optimizer="slo", lr=s.slo_lr, init_scale=1.0, C=s.slo_C),
    }


def make_optimizer(s: Settings, model: torch.nn.Module, spec: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer (SGD or AdamW, torch defaults but the lr) over ``model``; for the ``slo`` run SLO
    wraps it: layer ``promote_layer`` moves lr·C per step, every other layer lr/C."""
    cls = torch.optim.SGD if s.base_optimizer == "sgd" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=spec["lr"])
    if spec["optimizer"] == "slo":
        opt = SLOptimizer(opt, model=model, speeds=promote(model, s.promote_layer, spec["C"]))
    return opt


def run_one(
    s: Settings, name: str, spec: dict[str, Any], seed: int, E: torch.Tensor
) -> tuple[list[dict], torch.Tensor]:
    """Train one (run, seed); return its metric rows and the final first-layer NFM."""
    X, Y, Xt, Yt = chain_monomial_data(s.n_train, s.n_test, s.d, s.r, seed=seed)
    set_seed(seed)
    model = bias_free_mlp(s.d, s.width, s.depth, 1)
    scale_init_(model, spec["init_scale"])
    opt = make_optimizer(s, model, spec)
    mon = NFAMonitor(model)
    extra: dict[int, dict[str, float]] = {}

    def on_eval(step: int) -> None:
        mon.measure(X[: s.probe], step=step)
        extra[step] = {
            "feature_quality": float(feature_quality(nfm(model[0].weight.detach()), E)),
            "test_mse": mse(model, Xt, Yt),
            "train_mse": mse(model, X, Y),
        }

    train_mse(model, opt, X, Y, s.steps, s.batch, torch.Generator().manual_seed(seed + 10_000),
              eval_schedule(s.steps, s.eval_every), on_eval, desc=f"{name} seed {seed}")
    mon.detach()
    rows = []
    for rec in mon.to_rows():
        head = {"run": name, "seed": seed, "step": rec["step"], "layer": rec["layer"], "uc_nfa": rec["uc_nfa"],
                "c_nfa": rec["c_nfa"], **extra[rec["step"]]}
        rows.append({**head, **{k: v for k, v in rec.items() if k not in head}})
    return rows, nfm(model[0].weight.detach())


def observations(first: dict[str, dict[str, list[float]]], promoted: dict[str, dict[str, list[float]]], s: Settings,
                 var: float) -> str:
    """Plain-language check of the paper's claims on the final values (lists over seeds) of the first layer
    (``first``) and of the promoted layer (``promoted``; the same when it is the first)."""

    def claim(text: str, a: tuple[str, list[float]], b: tuple[str, list[float]], higher: bool = True) -> str:
        (ma, sa), (mb, sb) = mean_std(a[1]), mean_std(b[1])
        holds = ma > mb if higher else ma < mb
        if len(a[1]) < 2 or len(b[1]) < 2:
            verdict = ("yes" if holds else "**no**") + " on one seed (no seed spread to compare with)"
        elif abs(ma - mb) <= sa + sb:
            verdict = "not resolved: the difference is within the seed spread (mean ± std overlap)"
        else:
            verdict = "yes" if holds else "**no**"
        return f"- {text}? {verdict} ({a[0]} {ma:.3f} vs {b[0]} {mb:.3f})."

    b, B = s.base_optimizer, {"sgd": "SGD", "adamw": "AdamW"}[s.base_optimizer]
    base, small, slo = first[b], first["small_init"], first["slo"]
    p = s.promote_layer
    lines = [
        claim(f"Standard-init {B}: C-NFA above UC-NFA (the centered alignment is masked by the initial weights)",
              ("C-NFA", base["c_nfa"]), ("UC-NFA", base["uc_nfa"])),
        claim(f"Small init raises the first-layer UC-NFA over standard-init {B}",
              ("small_init", small["uc_nfa"]), (b, base["uc_nfa"])),
        claim("Small init raises the feature quality",
              ("small_init", small["feature_quality"]), (b, base["feature_quality"])),
    ]
    if p == "0":
        lines += [
            claim(f"SLO (standard init) raises the first-layer UC-NFA over standard-init {B}",
                  ("slo", slo["uc_nfa"]), (b, base["uc_nfa"])),
            claim("SLO raises the feature quality", ("slo", slo["feature_quality"]), (b, base["feature_quality"])),
        ]
    else:
        lines += [
            claim(f"SLO (standard init, layer {p} promoted) raises layer {p}'s UC-NFA over standard-init {B}",
                  ("slo", promoted["slo"]["uc_nfa"]), (b, promoted[b]["uc_nfa"])),
            claim(f"SLO (layer {p} promoted) raises layer {p}'s C-NFA over standard-init {B}",
                  ("slo", promoted["slo"]["c_nfa"]), (b, promoted[b]["c_nfa"])),
        ]
    lines += [
        claim("Small init lowers the test MSE", ("small_init", small["test_mse"]), (b, base["test_mse"]),
              higher=False),
        claim("SLO lowers the test MSE", ("slo", slo["test_mse"]), (b, base["test_mse"]), higher=False),
    ]
    return "\n".join(lines) + f"\n\n(Var f* = {var:g}: a test MSE of 0.2 is R² ≈ {1 - 0.2 / var:.2f}.)\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, validated; checks the output folder and matplotlib before any training."""
    ap = preset_parser(__doc__, PRESETS, "results/chain_monomial")
    ap.add_argument("--seeds", type=nonnegative_int, nargs="+", help="override the preset's seeds")
    ap.add_argument("--steps", type=positive_int, help="override the preset's number of SGD steps")
    ap.add_argument("--slo-C", type=positive_float, help="override the SLO speed C of the promoted layer (others 1/C)")
    ap.add_argument("--promote-layer", help="the layer SLO promotes: 0 (the first, default), 2, ..., 2*depth")
    ap.add_argument("--base-optimizer", choices=BASE_OPTIMIZERS,
                    help="optimizer of all three runs, wrapped by SLO in the slo run (default: sgd)")
    args = parse_checked(ap, argv)
    layer, depth = args.promote_layer, PRESETS[args.preset].depth
    if layer is not None and layer not in linear_layers(depth):
        ap.error(f"argument --promote-layer: {layer!r} is not a linear layer of the {args.preset} preset's MLP; "
                 f"choose one of {linear_layers(depth)}")
    return args


def report(s: Settings, preset: str, rows: list[dict], command: list[str]) -> str:
    """The markdown of ``results.md``: final values, the paper's claims checked on them, the settings."""
    last = [r for r in rows if r["step"] == s.steps]
    first = [r for r in last if r["layer"] == "0"]
    promoted = [r for r in last if r["layer"] == s.promote_layer]
    keys = ("uc_nfa", "c_nfa", "feature_quality", "test_mse")

    def final(layer_rows: list[dict]) -> dict[str, dict[str, list[float]]]:
        return {name: {k: [r[k] for r in layer_rows if r["run"] == name] for k in keys} for name in runs(s)}

    p = s.promote_layer
    runs_table = markdown_table(
        ["run", "optimizer", "lr", "init scale", "SLO speeds"],
        [[n, f"slo over {s.base_optimizer}" if v["optimizer"] == "slo" else v["optimizer"], v["lr"], v["init_scale"],
          f"layer {p}: {v['C']:g}, others: {1 / v['C']:g}" if v["C"] else "-"] for n, v in runs(s).items()],
    )
    promoted_table = "" if p == "0" else (
        f"\n## Final values, promoted layer {p}\n\n"
        + mean_std_table(promoted, ["run"], ["uc_nfa", "c_nfa", "rel_change"]))
    return (
        f"# Chain monomial ({preset} preset)\n\n"
        f"`{command_line(command)}`\n\n"
        f"## Final values, first layer (mean ± std over seeds {list(s.seeds)}, step {s.steps})\n\n"
        + mean_std_table(first, ["run"], ["uc_nfa", "c_nfa", "feature_quality", "test_mse"])
        + promoted_table
        + "\n## Final NFA correlations, every layer\n\n"
        + mean_std_table(last, ["run", "layer"], ["uc_nfa", "c_nfa", "rel_change"])
        + f"\nThe readout (layer {2 * s.depth}) has a single output, so its `K` is 1x1 and both its correlations are 1 by "
        "construction; `nfa_curves.png` draws no panel for it.\n"
        + "\n## Paper claims, checked on these numbers\n\n"
        + observations(final(first), final(promoted), s, var=float(s.r))
        + "\n## Settings\n\n" + runs_table + "\n"
        + settings_table(asdict(s))
        + "\nTask: `x ~ N(0, I_d)`, `f*(x) = sum_{i=1}^{r} x_i x_{i+1}` (reconstructed setting, see docs/experiments.md), MSE "
        "`mean((f(x) - y)^2)`, bias-free ReLU MLP with PyTorch default init, minibatch "
        f"{'SGD' if s.base_optimizer == 'sgd' else 'AdamW (torch defaults but the lr)'}. `K` exact on the "
        "first `probe` training points; feature quality = Pearson correlation of the first-layer NFM with "
        "`EGOP*` (autograd, `egop_samples` Gaussian draws).\n"
        "\nFigures: `nfa_curves.png`, `feature_quality_test_mse.png`, `nfm_vs_egop.png`.\n"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    s = preset_settings(PRESETS, args, ("seeds", "steps", "slo_C", "promote_layer", "base_optimizer"))

    t0 = time.perf_counter()
    Xe = torch.randn(s.egop_samples, s.d, generator=torch.Generator().manual_seed(2**31 - 1))
    E = egop(lambda x: chain_monomial(x, s.r), Xe)
    rows: list[dict] = []
    nfms: dict[str, torch.Tensor] = {}
    for name, spec in runs(s).items():
        for seed in s.seeds:
            run_rows, F = run_one(s, name, spec, seed, E)
            rows += run_rows
            nfms.setdefault(name, F)  # first seed's final NFM for the heatmaps
    wall = time.perf_counter() - t0

    out = args.out
    write_csv(rows, out / "metrics.csv")
    plot_nfa_curves(rows, out / "nfa_curves.png", title="chain monomial: NFA correlations per layer",
                    layer_names=layer_names(s.depth))
    plot_scalar_curves(rows, out / "feature_quality_test_mse.png", log_keys=("test_mse",))
    plot_matrices({"target EGOP*": E, **{f"NFM layer 0, {k}": v for k, v in nfms.items()}}, out / "nfm_vs_egop.png",
                  index_name="x")
    finish_run(out, report(s, args.preset, rows, [__file__, *argv]), [__file__, *argv], wall)


if __name__ == "__main__":
    main()
