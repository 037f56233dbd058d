#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the CUDA tests, then the benchmarks at GPU sizes, written to one
# markdown report (default device_check.md, or the first argument). Without CUDA it says so and exits 0.
#
#     bash benchmarks/device_check.sh [report.md]
#
# Budget: under 8 minutes in total (each step has its own timeout; a step that fails or times out is
# reported and the next one runs; the exit status is that of the first failure).
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "device_check: no CUDA device here (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi
report=${1:-device_check.md}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
{
    echo "# Device check"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")')"
} > "$report"

step() {  # step TITLE SECONDS COMMAND...: run COMMAND with a timeout, its output as a section of the report
    local title=$1 seconds=$2
    shift 2
    echo "device_check: $title" >&2
    local start=$SECONDS rc=0
    timeout "$seconds" "$@" > "$tmp" 2>&1 || rc=$?
    { echo; echo "## $title"; echo; echo "\`$*\` (exit status $rc, $((SECONDS - start)) s)"; echo; echo '```'
      tail -n 60 "$tmp"; echo '```'; } >> "$report"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

step "CUDA tests" 180 "$PYTHON" -m pytest -q -rs tests/test_cuda.py tests/test_slo_optimizer.py tests/test_diag_robust.py -k cuda
step "Cost of K (ptk_cost.py --quick --device cuda)" 90 "$PYTHON" benchmarks/ptk_cost.py --quick --device cuda
step "Cost of monitoring a Trainer run (monitor_overhead.py --quick --device cuda)" 120 \
    "$PYTHON" benchmarks/monitor_overhead.py --quick --device cuda
step "Cost of an SLO step (slo_step.py at GPT-2 small's size, --device cuda)" 90 \
    "$PYTHON" benchmarks/slo_step.py --device cuda --layers 100 --width 1024 --steps 100 --warmup 20 \
    --whole-steps 10 --gpt2-blocks 12 --gpt2-width 768 --seq 512 --batch 8
echo "device_check: report written to $report" >&2
exit "$status"
