"""VGG-11 without BatchNorm on images: UC-NFA and C-NFA of all eight conv layers in patch space, every epoch.

The authors' conv settings: VGG-11's eight 3x3 conv layers (padding 1, stride 1) with max-pooling, an
average pool to 1x1 and the classifier 512 -> 4096 -> 4096 -> classes with dropout; Kaiming-normal (fan_out)
conv init and N(0, 0.01) linear init (biases 0); SGD with momentum 0.9 and batch 256 on the MSE to one-hot
labels minus 1/C, one epoch at lr 1e-4, then lr 1.0. A conv layer is measured as the linear map
``h = W p`` on its unfolded 3x3 patches ``p``: ``W`` is the weight reshaped to ``(out, in·3·3)`` and ``K``
sums over samples, outputs and spatial positions. ``--width-mult`` scales every channel count and the
classifier's hidden width (1 = the real VGG-11). ``digits`` (scikit-learn's 8x8 digits upsampled to 32x32,
three channels) is an offline smoke run, not the paper's data.

SLO promotes ``--promote-layer`` (one or more names: one SLO run each) over the same SGD with momentum.
The default speeds are relative to each layer's weight norm (``speed_unit="relative"``: a step moves a layer
by ``lr·C_l·‖W_l‖_F``): the promoted layer at ``C = 1e-2``, every other layer at ``3e-4``, lr 1 every epoch.

    python examples/image_cnn.py --dataset digits --optimizer both --promote-layer features.conv1 features.conv4 \
        features.conv8 --width-mult 0.125 --batch 64 --epochs 40 --probe 128 --seed 0 1 --jobs 8 --out results/image_cnn_digits
    python examples/image_cnn.py --dataset cifar10 --data-dir ~/data --optimizer both --device cuda --out runs/vgg

Writes ``metrics.csv``, ``results.md``, ``nfa_curves.png`` and ``loss_accuracy.png`` to ``--out``. A missing or
malformed data folder exits with status 2 and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from diagnostics import NFAMonitor, plot_nfa_curves, plot_scalar_curves
from diagnostics.datasets import DataError, ImageData, centered_one_hot, channel_stats, load_dataset, standardize
from diagnostics.experiments import PhaseTimer, check_ready, command_line, exit_on, last_rows, make_parser
from diagnostics.experiments import markdown_table, mean_std, mean_std_table, namespace_settings, nfa_long_rows, nfa_row, nonnegative_int
from diagnostics.experiments import positive_float, positive_int, set_seed, settings_table, torch_device
from diagnostics.experiments import eval_mode, train_epochs, write_csv, write_run_info
from diagnostics.files import atomic_write_text
from slo_torch import SLOptimizer

#: VGG-11's feature stack ("A" in the VGG paper): conv output channels, "M" = 2x2 max-pool.
VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
CLASSIFIER_WIDTH = 4096
# SLO over SGD with momentum 0.9, speeds relative to each layer's norm: one step moves the promoted layer by
# lr·C·‖W_l‖ = 1% of its norm (up to 10x that once momentum has built up along a steady direction) and every
# other layer by 0.03% of its norm. Every layer trains, at a pace set by its own scale: the conv layers
# (Kaiming init) and the N(0, 0.01) classifier differ in norm by orders of magnitude, so one absolute
# (Frobenius) speed either freezes the classifier or throws the conv layers around. On digits (width 1/8,
# 40 epochs, seed 0, conv1 promoted) others at 3e-4 / 1e-4 gave conv1 UC-NFA 0.966 / 0.993 and test accuracy
# 0.988 / 0.979 (SGD: 0.946 and 0.989); at 1e-3 the conv1 UC-NFA was about SGD's.
SLO_LR = 1.0
SLO_C = 1e-2
SLO_OTHERS = 3e-4
SLO_UNIT = "relative"
SPEED_UNITS = ("frobenius", "rms", "relative")
PROMOTE_LAYER = "features.conv1"


def vgg11(num_classes: int, width_mult: float = 1.0, in_channels: int = 3, dropout: float = 0.5) -> nn.Sequential:
    """VGG-11 without BatchNorm: ``features`` (conv1..conv8 with ReLU and max-pools), ``avgpool`` to 1x1 and
    ``classifier`` (Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear); every channel count and the
    classifier width multiplied by ``width_mult`` (rounded, at least 1). Init as torchvision's VGG:
    conv ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, linear ``N(0, 0.01)``, biases 0."""
    if not (math.isfinite(width_mult) and width_mult > 0):
        raise ValueError(f"vgg11: width_mult must be a finite number > 0, got {width_mult!r}")

    def scaled(c: int) -> int:
        return max(1, round(c * width_mult))

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels, conv, pool = in_channels, 0, 0
    for item in VGG11_CONFIG:
        if item == "M":
            pool += 1
            layers[f"pool{pool}"] = nn.MaxPool2d(kernel_size=2, stride=2)
        else:
            conv += 1
            layers[f"conv{conv}"] = nn.Conv2d(channels, scaled(int(item)), kernel_size=3, padding=1)
            layers[f"relu{conv}"] = nn.ReLU(inplace=True)
            channels = scaled(int(item))
    hidden = scaled(CLASSIFIER_WIDTH)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(layers),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        classifier=nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        ),
    ))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def conv_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Conv2d`` modules of ``model`` in model order (``features.conv1`` ... ``features.conv8``)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def cnn_tensors(data: ImageData, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, Y_train, X_test, Y_test)`` on ``device``: images with three channels (a grey channel is
    repeated), standardised per channel with the training mean/std; targets one-hot minus ``1/C``."""
    mean, std = channel_stats(data.train.images)
    out = []
    for split in (data.train, data.test):
        x = standardize(split.images, mean, std)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        out += [x.contiguous().to(device), centered_one_hot(split.labels, data.num_classes).to(device)]
    return out[0], out[1], out[2], out[3]


@torch.no_grad()
def loss_accuracy(model: nn.Module, X: Tensor, Y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """MSE ``mean((f(x) - y)^2)`` and accuracy ``mean(argmax f(x) == argmax y)`` in eval mode, in batches."""
    sq, hits = X.new_zeros((), dtype=torch.float64), X.new_zeros((), dtype=torch.int64)
    with eval_mode(model):
        for start in range(0, X.shape[0], batch):
            out, y = model(X[start:start + batch]), Y[start:start + batch]
            sq += ((out - y) ** 2).sum(dtype=torch.float64)
            hits += (out.argmax(dim=1) == y.argmax(dim=1)).sum()
    return float(sq / Y.numel()), float(hits) / X.shape[0]


def layers_with_parameters(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` with parameters of their own (SLO's layers): the conv and linear layers."""
    return [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


def make_optimizer(model: nn.Module, optimizer: str, args: argparse.Namespace,
                   promoted: str | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (``sgd``), or SLO over it (``slo``): layer ``promoted`` at speed ``--slo-C``, every
    other layer (each conv or linear module: weight and bias together) at ``--slo-others``, in ``--speed-unit``."""
    base = torch.optim.SGD(model.parameters(), lr=args.warmup_lr, momentum=args.momentum)
    if optimizer == "sgd":
        return base
    return SLOptimizer(base, model=model, speeds={promoted: args.slo_C, "*": args.slo_others},
                       speed_unit=args.speed_unit)


def run_name(optimizer: str, promoted: str | None, args: argparse.Namespace) -> str:
    """``sgd``; ``slo`` when one layer is promoted, else ``slo <layer>``."""
    return f"slo {promoted}" if optimizer == "slo" and len(args.promote_layer) > 1 else optimizer


def schedule(args: argparse.Namespace, optimizer: str) -> tuple[float, float]:
    """(learning rate of the first epoch, learning rate afterwards) for ``optimizer``."""
    return (args.slo_lr, args.slo_lr) if optimizer == "slo" else (args.warmup_lr, args.lr)


def train_run(args: argparse.Namespace, data: ImageData, tensors: tuple[Tensor, ...], probe: Tensor,
              optimizer: str, seed: int, promoted: str | None = None) -> tuple[list[dict[str, Any]], str]:
    """Train one (optimizer, promoted layer, seed); return one row per (epoch, conv layer) (epoch 0 = init) and
    a status line."""
    X, Y, Xt, Yt = tensors
    set_seed(seed)
    model = vgg11(data.num_classes, args.width_mult).to(X.device)
    opt = make_optimizer(model, optimizer, args, promoted)
    name = run_name(optimizer, promoted, args)
    warm_lr, lr = schedule(args, optimizer)
    mon = NFAMonitor(model, layers=conv_layers(model))
    rows: list[dict[str, Any]] = []
    timer = PhaseTimer()

    def record(epoch: int, epoch_lr: float, train_loss: float) -> None:
        with timer("test set"):
            test_loss, test_acc = loss_accuracy(model, Xt, Yt)
        with timer(f"K and NFA on {probe.shape[0]} images"):
            records = mon.measure(probe, step=epoch)
        rows.extend(nfa_row({"run": name, "promoted": promoted or "", "seed": seed, "epoch": epoch}, rec, lr=epoch_lr, train_loss=train_loss,
                            test_loss=test_loss, test_acc=test_acc) for rec in records.values())

    record(0, 0.0, loss_accuracy(model, X, Y)[0])
    timer.reset()  # per-epoch figures below: epochs 1.. only
    phase = f"train ({max(1, X.shape[0] // args.batch)} steps of {min(args.batch, X.shape[0])})"
    status = train_epochs(model, opt, X, Y, args.epochs, args.batch, torch.Generator().manual_seed(seed + 10_000),
                          lambda epoch: warm_lr if epoch == 1 else lr, record, timer, phase,
                          desc=f"{data.name} {name} seed {seed}")
    mon.detach()
    print(f"{name} seed {seed}: {timer.per_epoch(max(r['epoch'] for r in rows))}", file=sys.stderr)
    return rows, status


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments, validated; checks the output folder and the optional packages before training."""
    ap = make_parser(__doc__)
    ap.add_argument("--dataset", choices=("cifar10", "digits"), required=True,
                    help="cifar10 (the paper's data) or digits (offline smoke run)")
    ap.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py/ or cifar-10-batches-bin/")
    ap.add_argument("--optimizer", choices=("sgd", "slo", "both"), default="both", help="runs to train")
    ap.add_argument("--epochs", type=positive_int, default=150, help="training epochs, the first at --warmup-lr")
    ap.add_argument("--max-train", type=positive_int, help="random subset of the training set (default: all)")
    ap.add_argument("--max-test", type=positive_int, help="random subset of the test set (default: all)")
    ap.add_argument("--probe", type=positive_int, default=1000, help="first training images on which K is computed")
    ap.add_argument("--width-mult", type=positive_float, default=1.0,
                    help="multiplies every channel count and the classifier width (1 = VGG-11)")
    ap.add_argument("--seed", type=nonnegative_int, nargs="+", default=[0], help="one or more seeds")
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    ap.add_argument("--batch", type=positive_int, default=256, help="minibatch size")
    ap.add_argument("--lr", type=positive_float, default=1.0, help="SGD learning rate after the first epoch")
    ap.add_argument("--warmup-lr", type=positive_float, default=1e-4, help="SGD learning rate of the first epoch")
    ap.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (also under SLO)")
    ap.add_argument("--slo-lr", type=positive_float, default=SLO_LR, help="learning rate under SLO (every epoch)")
    ap.add_argument("--promote-layer", nargs="+", default=[PROMOTE_LAYER], metavar="NAME",
                    help="layer(s) SLO promotes, one SLO run per name (features.conv1 ... features.conv8, "
                         f"classifier.0/3/6; default {PROMOTE_LAYER})")
    ap.add_argument("--speed-unit", choices=SPEED_UNITS, default=SLO_UNIT,
                    help="SLO speed unit: relative (a step moves layer l by lr·C_l·‖W_l‖_F), rms (lr·C_l·√n_l) or "
                         "frobenius (lr·C_l)")
    ap.add_argument("--slo-C", type=positive_float, default=SLO_C, help="SLO speed of the promoted layer")
    ap.add_argument("--slo-others", type=positive_float, default=SLO_OTHERS, help="SLO speed of every other layer")
    ap.add_argument("--device", type=torch_device, default="cpu", help="torch device, e.g. cpu or cuda")
    ap.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (per process)")
    ap.add_argument("--jobs", type=positive_int, default=1,
                    help="train the runs (optimizer, promoted layer, seed) in this many processes (CPU only)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.momentum < 1.0:
        ap.error(f"--momentum must lie in [0, 1), got {args.momentum}")
    if args.jobs > 1 and args.device.type != "cpu":
        ap.error(f"argument --jobs: parallel runs are for --device cpu; with --device {args.device} use --jobs 1")
    names = layers_with_parameters(vgg11(10, 0.01))  # the names do not depend on the width
    unknown = [n for n in args.promote_layer if n not in names]
    if unknown:
        ap.error(f"argument --promote-layer: {unknown} not a layer of VGG-11; choose from {names}")
    if len(set(args.promote_layer)) < len(args.promote_layer):
        ap.error(f"argument --promote-layer: a layer is named twice in {args.promote_layer}")
    check_ready(ap, args.out, modules=["matplotlib"] + (["sklearn.datasets"] if args.dataset == "digits" else []))
    return args


def promoted_table(final: list[Mapping[str, Any]]) -> str:
    """Markdown: per SLO run, the promoted layer's final UC-NFA and C-NFA and the test accuracy against the SGD
    run's (mean ± std over seeds); empty without both an SGD and an SLO run."""
    def cell(run: str, layer: str, key: str) -> str:
        vals = [float(r[key]) for r in final if r["run"] == run and r["layer"] == layer]
        if not vals:
            return "n/a"
        mean, std = mean_std(vals)
        return f"{mean:.3f}" if len(vals) == 1 else f"{mean:.3f} ± {std:.3f}"

    slo_runs = list(dict.fromkeys((r["run"], r["promoted"]) for r in final if r["promoted"]))
    if not slo_runs or not any(r["run"] == "sgd" for r in final):
        return ""
    body = [[layer, run, cell(run, layer, "uc_nfa"), cell("sgd", layer, "uc_nfa"), cell(run, layer, "c_nfa"),
             cell("sgd", layer, "c_nfa"), cell(run, layer, "test_acc"), cell("sgd", layer, "test_acc")]
            for run, layer in slo_runs]
    return ("\n## Promoted layer against SGD (final epoch)\n\n"
            + markdown_table(["promoted layer", "run", "UC-NFA slo", "UC-NFA sgd", "C-NFA slo", "C-NFA sgd",
                              "test acc slo", "test acc sgd"], body))


def write_outputs(args: argparse.Namespace, data: ImageData, rows: list[dict[str, Any]], statuses: list[str],
                  wall: float, command: list[str], n_probe: int) -> str:
    """metrics.csv, nfa_curves.png, loss_accuracy.png and results.md; returns the markdown."""
    out = args.out
    write_csv(rows, out / "metrics.csv")
    plot_rows = [{**r, "step": r["epoch"]} for r in rows]
    plot_nfa_curves(nfa_long_rows(rows), out / "nfa_curves.png", metrics=("correlation",), linestyle_key="measure",
                    title=f"{data.name}, VGG-11 x{args.width_mult:g}: UC-NFA (solid) and C-NFA (dashed) per conv "
                          "layer, patch space", x_label="epoch")
    plot_scalar_curves(plot_rows, out / "loss_accuracy.png", keys=("train_loss", "test_loss", "test_acc"),
                       log_keys=("train_loss", "test_loss"), title=f"{data.name}, VGG-11 x{args.width_mult:g}",
                       x_label="epoch")
    final = last_rows(rows, "epoch")
    first = [r for r in final if r["layer"] == rows[0]["layer"]]
    channels = [m.out_channels for m in vgg11(data.num_classes, args.width_mult).modules() if isinstance(m, nn.Conv2d)]
    settings = namespace_settings(args)
    settings["conv channels"] = " ".join(map(str, channels))
    settings["classifier"] = f"{channels[-1]} -> {max(1, round(CLASSIFIER_WIDTH * args.width_mult))} x 2 -> " \
                             f"{data.num_classes}, dropout 0.5"
    for optimizer in dict.fromkeys("slo" if r["promoted"] else "sgd" for r in rows):
        warm, lr = schedule(args, optimizer)
        settings[f"lr schedule ({optimizer})"] = f"epoch 1: {warm:g}, then {lr:g}"
    if any(r["promoted"] for r in rows):
        settings["SLO speeds"] = f"promoted layer {args.slo_C:g}, every other layer {args.slo_others:g} " \
                                 f"(speed_unit={args.speed_unit!r})"
    c, h, w = data.image_shape
    text = (
        f"# VGG-11 (no BatchNorm) on {data.name}, width x{args.width_mult:g}\n\n`{command_line(command)}`\n\n"
        + ("Smoke run on scikit-learn's 8x8 digits upsampled to 32x32 with the grey channel repeated three "
           "times - not the paper's data.\n\n" if data.name == "digits" else "")
        + f"Data: {len(data.train)} train / {len(data.test)} test images, {c}x{h}x{w} (fed as 3 channels), "
        f"{data.num_classes} classes; K on the first {n_probe} training images, every conv layer in patch space "
        "(`W` = weight reshaped to (out, in·3·3), `K` summed over samples, outputs and positions).\n\n"
        + (("**Runs that did not finish:** " + "; ".join(statuses) + "\n\n") if statuses else "")
        + f"## Final loss and accuracy (mean ± std over seeds {args.seed})\n\n"
        "`train_loss`: mean minibatch loss of the last epoch (dropout on); epoch 0: the initial network's loss on "
        "the training set.\n\n"
        + mean_std_table(first, ["run", "epoch"], ["train_loss", "test_loss", "test_acc"])
        + promoted_table(final)
        + "\n## Final NFA correlations per conv layer\n\n"
        + mean_std_table(final, ["run", "layer"], ["uc_nfa", "c_nfa", "rel_change", "kernel_alignment"])
        + "\n## Settings\n\n" + settings_table(settings)
        + "\nFigures: `nfa_curves.png` (one panel per conv layer), `loss_accuracy.png`.\n"
    )
    atomic_write_text(out / "results.md", text)
    write_run_info(out, command, wall)
    return text


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with exit_on(DataError):  # read and check all data before anything is written
        data = load_dataset(args.dataset, args.data_dir, image_size=32 if args.dataset == "digits" else None,
                            max_train=args.max_train, max_test=args.max_test, seed=0)
    tensors = cnn_tensors(data, args.device)
    probe = tensors[0][: args.probe]  # the loader shuffled the training set once (seed 0)
    runs = [(optimizer, seed, promoted) for optimizer in (("sgd", "slo") if args.optimizer == "both" else (args.optimizer,))
            for promoted in (args.promote_layer if optimizer == "slo" else [None]) for seed in args.seed]
    if args.jobs == 1:
        results = [train_run(args, data, tensors, probe, *run) for run in runs]
    else:  # each run is seeded on its own: the same rows as one process, in the same order
        with ProcessPoolExecutor(min(args.jobs, len(runs)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            results = [f.result() for f in [pool.submit(train_run, args, data, tensors, probe, *run) for run in runs]]
    rows: list[dict[str, Any]] = [row for run_rows, _ in results for row in run_rows]
    unfinished = [f"{run_name(optimizer, promoted, args)} seed {seed}: {status}"
                  for (optimizer, seed, promoted), (_, status) in zip(runs, results) if status != "completed"]
    wall = time.perf_counter() - t0
    print(write_outputs(args, data, rows, unfinished, wall, ["examples/image_cnn.py", *argv], probe.shape[0]))


if __name__ == "__main__":
    main()
