"""Helpers for experiment scripts built on :mod:`diagnostics`: command lines (:mod:`.cli`), training loops on
the MSE (:mod:`.training`) and results as CSV and markdown tables (:mod:`.report`).

The scripts in ``examples/`` use them; so can a copy of one of those scripts anywhere else. Nothing here
imports ``slo_torch``: a script builds its optimizer (plain or ``SLOptimizer``) and passes it in.
"""

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
    eval_schedule,
    hidden_layers,
    minibatches,
    mse,
    progress,
    scale_init_,
    set_seed,
    train_epochs,
    train_mse,
)

__all__ = [
    "make_parser",
    "preset_parser",
    "parse_checked",
    "preset_settings",
    "positive_int",
    "nonnegative_int",
    "positive_float",
    "nonnegative_float",
    "torch_device",
    "check_ready",
    "command_line",
    "exit_on",
    "write_csv",
    "markdown_table",
    "mean_std",
    "mean_std_table",
    "settings_table",
    "namespace_settings",
    "nfa_long_rows",
    "nfa_row",
    "last_rows",
    "write_run_info",
    "finish_run",
    "bias_free_mlp",
    "hidden_layers",
    "scale_init_",
    "set_seed",
    "minibatches",
    "mse",
    "eval_schedule",
    "train_mse",
    "train_epochs",
    "progress",
    "PhaseTimer",
]
