"""Helpers for experiment scripts built on :mod:`diagnostics`: command lines (:mod:`.cli`), training loops on
the MSE (:mod:`.training`), progress of long loops (:mod:`.console`) and results as CSV and markdown tables
(:mod:`.report`).

The scripts in ``examples/`` use them; so can a copy of one of those scripts anywhere else. Nothing here
imports ``slo_torch``: a script builds its optimizer (plain or ``SLOptimizer``) and passes it in.
"""

from . import cli, console, report, training
from .cli import (
    check_ready,
    command_line,
    exit_on,
    make_parser,
    nonnegative_float,
    nonnegative_int,
    parse_checked,
    positive_float,
    positive_int,
    preset_parser,
    preset_settings,
    torch_device,
)
from .console import Progress, interactive, progress
from .report import (
    finish_run,
    last_rows,
    markdown_table,
    mean_std,
    mean_std_table,
    namespace_settings,
    nfa_long_rows,
    nfa_row,
    settings_table,
    write_csv,
    write_run_info,
)
from .training import (
    PhaseTimer,
    bias_free_mlp,
    eval_mode,
    eval_schedule,
    hidden_layers,
    minibatches,
    mse,
    scale_init_,
    set_seed,
    train_epochs,
    train_mse,
)

__all__ = [*cli.__all__, *console.__all__, *report.__all__, *training.__all__]
