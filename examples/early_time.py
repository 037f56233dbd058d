"""Early-time C-NFA: the paper's early-time prediction against the C-NFA measured over the first GD steps.

At initialisation ``W_0`` the prediction is ``ρ(dW^T dW, dW^T K dW)`` with ``dW = Σ_{α,c} r_{α,c} g_{α,c} x_α^T``
(``early_cnfa_prediction``). The network is then trained by full-batch gradient descent on the MSE and
the C-NFA of each hidden layer is measured after every step (``K`` on the training set). Repeated for
several init scales (all weights multiplied by the scale) on the chain-monomial task.

    python examples/early_time.py --preset default --out results/early_time
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import torch

from diagnostics import NFAMonitor, early_cnfa_prediction, plot_nfa_curves
from diagnostics.datasets import chain_monomial_data
from diagnostics.experiments import bias_free_mlp, command_line, finish_run, hidden_layers, mean_std_table
from diagnostics.experiments import parse_checked, preset_parser, preset_settings, scale_init_, set_seed, settings_table
from diagnostics.experiments import train_mse, write_csv


@dataclass(frozen=True)
class Settings:
    d: int = 20
    r: int = 3
    n: int = 500  # training set = full batch = probe for K
    width: int = 256
    depth: int = 2
    steps: int = 100
    lr: float = 0.05
    scales: tuple[float, ...] = (1.0, 0.3, 0.1)
    seeds: tuple[int, ...] = (0, 1, 2)


PRESETS = {
    "smoke": Settings(d=8, n=64, width=32, steps=5, scales=(1.0, 0.1), seeds=(0,)),
    "default": Settings(),
}


def run_one(s: Settings, scale: float, seed: int) -> list[dict]:
    """Predicted and measured C-NFA rows for one (init scale, seed)."""
    X, Y, _, _ = chain_monomial_data(s.n, 0, s.d, s.r, seed=seed)
    set_seed(seed)
    model = bias_free_mlp(s.d, s.width, s.depth, 1)
    scale_init_(model, scale)
    hidden = hidden_layers(s.depth)  # the readout's K is 1x1: its C-NFA is 1 trivially
    predicted = {layer: float(early_cnfa_prediction(model, layer, X, Y)) for layer in hidden}
    mon = NFAMonitor(model, layers=hidden)
    train_mse(model, torch.optim.SGD(model.parameters(), lr=s.lr), X, Y, s.steps, s.n, torch.Generator().manual_seed(seed),
              range(1, s.steps + 1), lambda step: mon.measure(X, step=step), desc=f"scale {scale} seed {seed}")
    mon.detach()
    rows = []
    for rec in mon.to_rows():
        base = {"init_scale": scale, "seed": seed, "step": rec["step"], "layer": rec["layer"]}
        rows.append({**base, "kind": "measured", "c_nfa": rec["c_nfa"], "rel_change": rec["rel_change"]})
        rows.append({**base, "kind": "predicted", "c_nfa": predicted[rec["layer"]], "rel_change": None})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, validated; checks the output folder and matplotlib before any training."""
    return parse_checked(preset_parser(__doc__, PRESETS, "results/early_time"), argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    s = preset_settings(PRESETS, args)

    t0 = time.perf_counter()
    rows = [r for scale in s.scales for seed in s.seeds for r in run_one(s, scale, seed)]
    wall = time.perf_counter() - t0

    out = args.out
    write_csv(rows, out / "metrics.csv")
    plot_nfa_curves(rows, out / "early_cnfa.png", metrics=("c_nfa",), group_key="init_scale", linestyle_key="kind",
                    title="C-NFA: measured (solid) vs predicted at init (dashed)")
    c_nfa = {(r["init_scale"], r["seed"], r["layer"], r["kind"], r["step"]): r["c_nfa"] for r in rows}
    summary = []
    for scale, seed, layer, kind, step in c_nfa:
        if kind != "predicted" or step != 1:
            continue
        pred = c_nfa[scale, seed, layer, "predicted", 1]
        first, last = c_nfa[scale, seed, layer, "measured", 1], c_nfa[scale, seed, layer, "measured", s.steps]
        summary.append({"init_scale": scale, "layer": layer, "predicted": pred,
                        "measured_step_1": first, "abs_error_step_1": abs(first - pred),
                        f"measured_step_{s.steps}": last, f"abs_error_step_{s.steps}": abs(last - pred)})
    values = [k for k in summary[0] if k not in ("init_scale", "layer")]
    text = (
        f"# Early-time C-NFA prediction ({args.preset} preset)\n\n"
        f"`{command_line([__file__, *argv])}`\n\n"
        f"Mean ± std over seeds {list(s.seeds)}; full-batch GD, lr {s.lr}, MSE; `K` on the {s.n} training points.\n\n"
        + mean_std_table(summary, ["init_scale", "layer"], values, digits=4)
        + "\n## Settings\n\n" + settings_table(asdict(s))
        + "\nFigure: `early_cnfa.png`.\n"
    )
    finish_run(out, text, [__file__, *argv], wall)


if __name__ == "__main__":
    main()
