"""Deep bias-free MLP on real images: UC-NFA and C-NFA of every layer over training, SGD vs SLO.

The authors' MLP settings: images flattened, standardised per channel with the training mean/std, targets
one-hot minus 1/C, 5 hidden bias-free ReLU layers of width 256 and a bias-free readout (PyTorch default
init), plain SGD, batch 128, MSE ``mean((f(x) - y)^2)``, first epoch at lr 1e-4 then lr 2.0·C/10
(C = number of classes), 150 epochs. The SLO run promotes one layer (speed ``C``, the others ``1/C``) over
plain SGD, so each layer moves exactly ``lr·C_l`` per step. After every epoch it records each layer's
UC-NFA and C-NFA (``NFAMonitor``, exact ``K`` on a fixed probe of training images) and the train/test
loss and accuracy; at the end it draws the first-layer NFM diagonal ``diag(W_1^T W_1)`` as an image.
``--preset authors`` applies the authors' per-dataset (lr, epochs): cifar10, cifar100, svhn (2.0, 150); stl10,
gtsrb (0.1, 150); mnist (10.0, 50); lr scaled by C/10. Images are 32x32 (MNIST 28x28).

    python examples/image_mlp.py --dataset digits --optimizer both --out results/image_mlp_digits
    python examples/image_mlp.py --dataset cifar10 --data-dir ~/data --preset authors --out runs/cifar10

Writes ``metrics.csv``, ``nfm_diagonal.csv``, ``results.md``, ``nfa_curves.png``, ``loss_accuracy.png`` and
``nfm_diagonal.png`` to ``--out``. A missing or malformed data folder exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics import NFAMonitor, matrix_correlation, plot_matrices, plot_nfa_curves, plot_scalar_curves
from diagnostics.datasets import DATASET_MODULES, DATASETS, NATIVE_SIZE, DataError, ImageData, load_dataset
from diagnostics.datasets import mlp_tensors, pixel_map
from diagnostics.experiments import PhaseTimer, bias_free_mlp, check_ready, command_line, exit_on, last_rows
from diagnostics.experiments import make_parser, mean_std_table, namespace_settings, nfa_long_rows, nfa_row
from diagnostics.experiments import nonnegative_float, positive_float, progress, set_seed, settings_table
from diagnostics.experiments import eval_mode, torch_device, train_epochs, write_csv, write_run_info
from diagnostics.files import atomic_write_text
from slo_torch import SLOptimizer, promote

# SLO over plain SGD moves layer l by exactly lr·C_l per step (Frobenius norm). With C = 500 and lr = 1e-3 the
# promoted layer moves 0.5 per step (about 5% of its default-init norm sqrt(256/3) ≈ 9.2, a share that falls
# as the layer grows) and every other layer 2e-6 per step, i.e. it stays at its init. lr 1e-4 and 1e-5 were too
# slow to fit the digits in 150 epochs (see docs/images.md). No warm-up epoch: the step size is fixed by construction.
SLO_LR = 1e-3
SLO_C = 500.0
#: The authors' (lr for 10 classes, epochs) per data set; the lr is scaled by C/10.
AUTHORS_PRESET = {"cifar10": (2.0, 150), "cifar100": (2.0, 150), "svhn": (2.0, 150), "stl10": (0.1, 150),
                  "gtsrb": (0.1, 150), "mnist": (10.0, 50)}


@torch.no_grad()
def loss_accuracy(model: nn.Module, X: Tensor, Y: Tensor, labels: Tensor) -> tuple[float, float]:
    """MSE ``mean((f(x) - y)^2)`` and accuracy ``mean(argmax f(x) == label)`` in eval mode."""
    with eval_mode(model):
        out = model(X)
    return float(((out - Y) ** 2).mean()), float((out.argmax(dim=1) == labels).float().mean())


def schedule(args: argparse.Namespace, optimizer: str, num_classes: int) -> tuple[float, float]:
    """(learning rate of the first epoch, learning rate afterwards) for ``optimizer``."""
    if optimizer == "slo":
        return args.slo_lr, args.slo_lr
    if args.lr is not None:
        return args.warmup_lr, args.lr
    base = AUTHORS_PRESET[args.dataset][0] if args.preset == "authors" else 2.0
    return args.warmup_lr, base * num_classes / 10


def make_optimizer(model: nn.Module, optimizer: str, args: argparse.Namespace, lr: float) -> torch.optim.Optimizer:
    """Plain SGD, or SLO over it (``slo``): ``--promote-layer`` at speed ``C``, every other layer at ``1/C``, so
    each layer moves ``lr·C_l`` per step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return SLOptimizer(opt, model=model, speeds=promote(model, args.promote_layer, args.slo_C)) \
        if optimizer == "slo" else opt


def nfm_diagonal_map(model: nn.Module, data: ImageData) -> Tensor:
    """The first layer's ``diag(W^T W)_i = sum_k W_ki^2`` as an image (:func:`pixel_map`)."""
    return pixel_map((model[0].weight.detach() ** 2).sum(dim=0).cpu(), data.image_shape)


def train_run(
    args: argparse.Namespace, data: ImageData, tensors: tuple[Tensor, ...], probe: Tensor, optimizer: str, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Tensor], str]:
    """Train one (optimizer, seed); return per-(epoch, layer) rows (``step`` = epoch, 0 = init), the first-layer
    NFM diagonal maps at init and at the end, and a status line ("completed" or why it stopped)."""
    X, Y, Xt, Yt = tensors
    set_seed(seed)
    model = bias_free_mlp(X.shape[1], args.width, args.depth, data.num_classes).to(X.device)
    maps = {"init": nfm_diagonal_map(model, data)}
    warm_lr, lr = schedule(args, optimizer, data.num_classes)
    opt = make_optimizer(model, optimizer, args, warm_lr)
    mon = NFAMonitor(model)
    rows: list[dict[str, Any]] = []
    timer = PhaseTimer()

    def record(epoch: int, epoch_lr: float, _loss: float = math.nan) -> None:
        with timer("train and test sets"):
            train_loss, train_acc = loss_accuracy(model, X, Y, data.train.labels.to(X.device))
            test_loss, test_acc = loss_accuracy(model, Xt, Yt, data.test.labels.to(X.device))
        with timer(f"K and NFA on {probe.shape[0]} images"):
            records = mon.measure(probe, step=epoch)
        rows.extend(nfa_row({"run": optimizer, "seed": seed, "step": epoch}, rec, lr=epoch_lr, train_loss=train_loss,
                            train_acc=train_acc, test_loss=test_loss, test_acc=test_acc) for rec in records.values())

    record(0, 0.0)
    timer.reset()  # per-epoch figures below: epochs 1.. only
    status = train_epochs(model, opt, X, Y, args.epochs, args.batch, torch.Generator().manual_seed(seed + 10_000),
                          lambda epoch: warm_lr if epoch == 1 else lr, record, timer,
                          f"train ({max(1, X.shape[0] // args.batch)} steps)", desc=f"{data.name} {optimizer} seed {seed}")
    mon.detach()
    print(f"{optimizer} seed {seed}: {timer.per_epoch(max(r['step'] for r in rows))}", file=sys.stderr)
    maps["final"] = nfm_diagonal_map(model, data)
    return rows, maps, status


def tracking(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (run, seed, layer): UC-NFA at epoch 0 and at the end, C-NFA at the end, and the Pearson correlation
    over epochs 1.. of the UC-NFA and C-NFA curves (does the UC-NFA track the C-NFA?)."""
    out = []
    for key in dict.fromkeys((r["run"], r["seed"], r["layer"]) for r in rows):
        series = sorted((r for r in rows if (r["run"], r["seed"], r["layer"]) == key), key=lambda r: r["step"])
        uc = torch.tensor([r["uc_nfa"] for r in series[1:]], dtype=torch.float64)
        c = torch.tensor([r["c_nfa"] for r in series[1:]], dtype=torch.float64)
        both = torch.isfinite(uc) & torch.isfinite(c)
        uc, c = uc[both], c[both]
        flat = len(uc) < 3 or float(uc.std()) < 1e-6 or float(c.std()) < 1e-6  # e.g. the readout: both are 1
        corr = math.nan if flat else float(torch.corrcoef(torch.stack([uc, c]))[0, 1])
        out.append({"run": key[0], "seed": key[1], "layer": key[2], "uc_nfa_init": series[0]["uc_nfa"],
                    "uc_nfa_final": series[-1]["uc_nfa"], "c_nfa_final": series[-1]["c_nfa"],
                    "uc_c_corr_over_epochs": corr})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = make_parser(__doc__)
    ap.add_argument("--dataset", choices=DATASETS, required=True, help="data set")
    ap.add_argument("--data-dir", type=Path, help="folder with the data files (all but digits)")
    ap.add_argument("--preset", choices=("default", "authors"), default="default",
                    help="authors: their per-dataset lr and epochs (explicit --lr / --epochs win)")
    ap.add_argument("--optimizer", choices=("sgd", "slo", "both"), default="both", help="runs to train")
    ap.add_argument("--epochs", type=int, help="training epochs, the first at --warmup-lr (default 150, or the "
                    "preset's)")
    ap.add_argument("--max-train", type=int, help="random subset of the training set (CelebA: balanced)")
    ap.add_argument("--max-test", type=int, help="random subset of the test set (CelebA: balanced)")
    ap.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--attribute", default="Smiling", help="CelebA attribute used as the binary label")
    ap.add_argument("--image-size", type=int, help="CelebA: 32 (default) or 96; digits: 8 (default, native)")
    ap.add_argument("--width", type=int, default=256, help="hidden width")
    ap.add_argument("--depth", type=int, default=5, help="number of hidden layers")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size")
    ap.add_argument("--lr", type=nonnegative_float, help="SGD learning rate after the first epoch (default 2.0·C/10)")
    ap.add_argument("--warmup-lr", type=nonnegative_float, default=1e-4, help="SGD learning rate of the first epoch")
    ap.add_argument("--slo-lr", type=nonnegative_float, default=SLO_LR,
                    help="SGD learning rate under SLO (every epoch)")
    ap.add_argument("--slo-C", type=positive_float, default=SLO_C, help="SLO speed of the promoted layer (others 1/C)")
    ap.add_argument("--promote-layer", default="0", help="module name of the promoted layer ('0' = first)")
    ap.add_argument("--probe", type=int, default=500, help="training images on which K is computed")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", type=torch_device, default="cpu", help="torch device, e.g. cpu or cuda")
    args = ap.parse_args(argv)
    if args.preset == "authors" and args.dataset not in AUTHORS_PRESET:
        ap.error(f"--preset authors has no settings for {args.dataset} (only {', '.join(AUTHORS_PRESET)}); "
                 "use --preset default")
    if args.epochs is None:
        args.epochs = AUTHORS_PRESET[args.dataset][1] if args.preset == "authors" else 150
    for name in ("epochs", "width", "depth", "batch", "probe", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.seed) < 0:
        ap.error(f"--seed values must be >= 0, got {args.seed}")
    least = 2 if args.dataset == "celeba" else 1  # CelebA keeps max // 2 images of each class
    for name in ("max_train", "max_test"):
        value = getattr(args, name)
        if value is not None and value < least:
            ap.error(f"--{name.replace('_', '-')} must be >= {least} for {args.dataset}, got {value}")
    native = NATIVE_SIZE.get(args.dataset)
    if args.image_size is not None and (args.image_size < 1 or native not in (None, args.image_size)):
        ap.error(f"--image-size {args.image_size}: {args.dataset.upper()} images are {native}x{native}; only CelebA "
                 "and digits take a size")
    modules = ["matplotlib"] + ([DATASET_MODULES[args.dataset]] if args.dataset in DATASET_MODULES else [])
    check_ready(ap, args.out, modules=modules)
    return args


def write_outputs(args: argparse.Namespace, data: ImageData, rows: list[dict[str, Any]],
                  maps: dict[str, Tensor], init_similarity: list[dict[str, Any]], statuses: list[str], wall: float,
                  command: list[str]) -> str:
    """metrics.csv, nfm_diagonal.csv, the three figures and results.md; returns the markdown."""
    out, runs = args.out, list(dict.fromkeys(r["run"] for r in rows))
    write_csv(rows, out / "metrics.csv")
    write_csv([{"map": name, "row": i, "col": j, "value": float(m[i, j])} for name, m in maps.items()
               for i in range(m.shape[0]) for j in range(m.shape[1])], out / "nfm_diagonal.csv")
    plot_nfa_curves(nfa_long_rows(rows), out / "nfa_curves.png", metrics=("correlation",), linestyle_key="measure",
                    title=f"{data.name}: UC-NFA (solid) and C-NFA (dashed) per layer", x_label="epoch")
    plot_scalar_curves(rows, out / "loss_accuracy.png", keys=("train_loss", "test_loss", "train_acc", "test_acc"),
                       log_keys=("train_loss", "test_loss"), title=data.name, x_label="epoch")
    plot_matrices(maps, out / "nfm_diagonal.png", cmap="gray")

    last = max(r["step"] for r in rows)
    final = last_rows(rows)
    first_layer = [r for r in final if r["layer"] == "0"]
    track = tracking(rows)
    settings = namespace_settings(args)
    for name in runs:
        warm, lr = schedule(args, name, data.num_classes)
        settings[f"lr schedule ({name})"] = f"epoch 1: {warm:g}, then {lr:g}"
    c, h, w = data.image_shape
    text = (
        f"# Image MLP: {data.name}\n\n`{command_line(command)}`\n\n"
        f"Data: {len(data.train)} train / {len(data.test)} test images, {c}x{h}x{w}, {data.num_classes} classes "
        f"({', '.join(data.classes)}); K on the first {len(probe_indices(args, data))} images of a fixed "
        f"permutation of the training set.\n\n"
        + (("**Runs that did not finish:** " + "; ".join(statuses) + "\n\n") if statuses else "")
        + f"## Final accuracy and loss (mean ± std over seeds {args.seed}, epoch {last})\n\n"
        + mean_std_table(first_layer, ["run"], ["train_acc", "test_acc", "train_loss", "test_loss"])
        + "\n## Final NFA correlations per layer\n\n"
        + mean_std_table(final, ["run", "layer"], ["uc_nfa", "c_nfa", "rel_change"])
        + "\n## Does the UC-NFA track the C-NFA?\n\n"
        "`uc_c_corr_over_epochs`: Pearson correlation, over epochs 1.., of the UC-NFA and C-NFA curves of a layer "
        "(the C-NFA is undefined at epoch 0, where `W = W_0`). The readout's `K` is the identity (its outputs "
        "are the network's outputs), so its UC-NFA and C-NFA are 1 by construction (n/a here).\n\n"
        + mean_std_table(track, ["run", "layer"],
                         ["uc_nfa_init", "uc_nfa_final", "c_nfa_final", "uc_c_corr_over_epochs"])
        + "\n## First-layer NFM diagonal after training\n\n`corr_with_init`: Pearson correlation of the final "
        "`diag(W_1^T W_1)` with its value at init, over pixels: near 1 means the image still shows the random "
        "init, near 0 that the learned part dominates.\n\n"
        + mean_std_table(init_similarity, ["run"], ["corr_with_init"])
        + "\n## Settings\n\n" + settings_table(settings)
        + "\nFigures: `nfa_curves.png` (one panel per layer), `loss_accuracy.png`, `nfm_diagonal.png` (first-layer NFM "
        "diagonal as an image, summed over colour channels: at init and after training, first seed).\n"
    )
    atomic_write_text(out / "results.md", text)
    write_run_info(out, command, wall)
    return text


def probe_indices(args: argparse.Namespace, data: ImageData) -> Tensor:
    """The fixed probe: the first ``--probe`` entries of a seed-0 permutation of the training set."""
    return torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[: args.probe]


def load_data(args: argparse.Namespace) -> ImageData:
    """The data set of the command line; a missing or malformed folder exits with status 2 before anything is
    written."""
    with exit_on(DataError):
        return load_dataset(args.dataset, args.data_dir, attribute=args.attribute, image_size=args.image_size,
                            max_train=args.max_train, max_test=args.max_test, seed=0, progress=progress)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_data(args)
    tensors = tuple(t.to(args.device) for t in mlp_tensors(data))
    probe = tensors[0][probe_indices(args, data)]
    rows: list[dict[str, Any]] = []
    maps: dict[str, Tensor] = {}
    unfinished: list[str] = []
    init_similarity: list[dict[str, Any]] = []
    for optimizer in (("sgd", "slo") if args.optimizer == "both" else (args.optimizer,)):
        for seed in args.seed:
            run_rows, run_maps, status = train_run(args, data, tensors, probe, optimizer, seed)
            maps.setdefault("init", run_maps["init"])
            rows += run_rows
            if status != "completed":
                unfinished.append(f"{optimizer} seed {seed}: {status}")
            init_similarity.append({"run": optimizer, "seed": seed, "corr_with_init": float(
                matrix_correlation(run_maps["final"].double(), run_maps["init"].double()))})
            maps.setdefault(optimizer, run_maps["final"])
    wall = time.perf_counter() - t0
    print(write_outputs(args, data, rows, maps, init_similarity, unfinished, wall, ["examples/image_mlp.py", *argv]))


if __name__ == "__main__":
    main()
