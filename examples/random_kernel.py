"""Random-K control: NFA correlations with the true ``K`` against ``K`` with Haar-random eigenvectors.

Trains the chain-monomial MLP (standard-init and small-init SGD) and at every measurement computes each
hidden layer's UC-NFA ``ρ(W^T W, W^T K W)`` and C-NFA ``ρ(ΔW^T ΔW, ΔW^T K ΔW)`` twice: with the measured
``K`` and with ``randomize_kernel(K)`` (same spectrum, Haar-random eigenvectors; the correlations are
averaged over ``draws`` fresh draws per measurement). If the alignment is with ``K``'s eigenvectors, the random-``K`` correlations drop.

    python examples/random_kernel.py --preset default --out results/random_kernel
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass

import torch

from diagnostics import NFAMonitor, nfa_correlation, plot_nfa_curves, randomize_kernel
from diagnostics.datasets import chain_monomial_data
from diagnostics.experiments import bias_free_mlp, check_ready, command_line, eval_schedule, finish_run
from diagnostics.experiments import hidden_layers, mean_std_table, nonnegative_int, positive_int, preset_parser
from diagnostics.experiments import preset_settings, scale_init_, set_seed, settings_table, train_mse, write_csv


@dataclass(frozen=True)
class Settings:
    d: int = 20
    r: int = 3
    n_train: int = 1000
    width: int = 256
    depth: int = 2
    steps: int = 3000
    batch: int = 128
    lr: float = 0.05
    seeds: tuple[int, ...] = (0, 1)
    eval_every: int = 300
    probe: int = 500
    draws: int = 8  # random eigenbases per measurement (their correlations are averaged)
    init_scales: tuple[tuple[str, float], ...] = (("sgd", 1.0), ("small_init", 0.1))


PRESETS = {
    "smoke": Settings(d=8, n_train=256, width=32, steps=100, batch=64, seeds=(0,), eval_every=50, probe=128),
    "default": Settings(),
}


def effective_rank(A: torch.Tensor) -> float:
    """``(tr A)^2 / |A|_F^2`` of a PSD matrix (1 for rank one, ``k`` for a multiple of the identity)."""
    return float(A.trace() ** 2 / (A**2).sum())


def run_one(s: Settings, name: str, scale: float, seed: int) -> list[dict]:
    """Rows (true and random K) for one (run, seed)."""
    X, Y, _, _ = chain_monomial_data(s.n_train, 0, s.d, s.r, seed=seed)
    set_seed(seed)
    model = bias_free_mlp(s.d, s.width, s.depth, 1)
    scale_init_(model, scale)
    # hidden layers only: the readout's K is 1x1, randomising it changes nothing
    mon = NFAMonitor(model, layers=hidden_layers(s.depth))
    g = torch.Generator().manual_seed(seed + 20_000)
    rows: list[dict] = []

    def on_eval(step: int) -> None:
        for layer, rec in mon.measure(X[: s.probe], step=step, keep_matrices=True).items():
            W = mon.adapters[layer].weight_matrix().detach()
            dW = W - mon.W0[layer]  # the weights the monitor snapshotted at construction
            base = {"run": name, "seed": seed, "step": step, "layer": layer, "K_eff_rank": effective_rank(rec.K),
                    "dW_eff_rank": effective_rank(dW.T @ dW) if step > 0 else float("nan")}
            rows.append({**base, "kernel": "true", "uc_nfa": rec.uc_nfa, "c_nfa": rec.c_nfa})
            K_rand = [randomize_kernel(rec.K, generator=g) for _ in range(s.draws)]
            uc_rand = sum(float(nfa_correlation(W, K)) for K in K_rand) / s.draws
            c_rand = sum(float(nfa_correlation(dW, K)) for K in K_rand) / s.draws if step > 0 else float("nan")
            rows.append({**base, "kernel": "random", "uc_nfa": uc_rand, "c_nfa": c_rand})

    train_mse(model, torch.optim.SGD(model.parameters(), lr=s.lr), X, Y, s.steps, s.batch,
              torch.Generator().manual_seed(seed + 10_000), eval_schedule(s.steps, s.eval_every), on_eval,
              desc=f"{name} seed {seed}")
    mon.detach()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, validated; checks the output folder and matplotlib before any training."""
    ap = preset_parser(__doc__, PRESETS, "results/random_kernel")
    ap.add_argument("--d", type=positive_int, help="override the input dimension d (at least r + 1)")
    ap.add_argument("--seeds", type=nonnegative_int, nargs="+", help="override the preset's seeds")
    args = ap.parse_args(argv)
    r = PRESETS[args.preset].r
    if args.d is not None and args.d < r + 1:
        ap.error(f"argument --d: must be at least r + 1 = {r + 1} (the target uses x_1 .. x_{r + 1}), got {args.d}")
    check_ready(ap, args.out, modules=["matplotlib"])
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = preset_settings(PRESETS, args, ("d", "seeds"))

    t0 = time.perf_counter()
    rows = [r for name, scale in s.init_scales for seed in s.seeds for r in run_one(s, name, scale, seed)]
    wall = time.perf_counter() - t0

    out = args.out
    write_csv(rows, out / "metrics.csv")
    plot_nfa_curves(rows, out / "random_kernel.png", group_key="run", linestyle_key="kernel",
                    title="NFA with the true K (solid) vs a random K of the same spectrum (dashed)")
    final = [r for r in rows if r["step"] == s.steps]
    text = (
        f"# Random-K control ({args.preset} preset)\n\n"
        f"`{command_line([__file__, *argv])}`\n\n"
        f"Final values (step {s.steps}), mean ± std over seeds {list(s.seeds)}:\n\n"
        + mean_std_table(final, ["run", "layer", "kernel"], ["uc_nfa", "c_nfa", "K_eff_rank", "dW_eff_rank"])
        + "\n`K_eff_rank` = `(tr K)^2 / |K|_F^2`; `dW_eff_rank` the same for `ΔW^T ΔW`. For a Haar-random `Q`, "
        "`E[Q Λ Q^T] = (tr K / k) I`, so the random-`K` AGOP `W^T K_rand W` equals `(tr K / k) W^T W` on "
        "average: proportional to the NFM. The control lowers the correlations only through the fluctuation "
        "around that mean, which is large when `K` has few dominant eigenvalues compared with the number of "
        "directions `W^T W` spreads over; outside that regime the random-`K` correlations stay well above zero.\n"
        + "\n## Settings\n\n" + settings_table(asdict(s))
        + "\nFigure: `random_kernel.png`.\n"
    )
    finish_run(out, text, [__file__, *argv], wall)


if __name__ == "__main__":
    main()
