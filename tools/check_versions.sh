#!/usr/bin/env bash
# Run the default test suite against one torch version in a fresh virtual environment.
#
# Usage: tools/check_versions.sh [--keep] TORCH_VERSION [REQUIREMENT ...] [-- PYTEST_ARG ...]
#
#   tools/check_versions.sh 2.6.0 transformers==5.2.0 accelerate==1.3.0   # the supported floors
#   tools/check_versions.sh 2.14.1                                        # the newest torch tested
#   tools/check_versions.sh --keep 2.6.0 -- tests/test_hf_slo.py -x       # keep the venv, one file
#
# Builds `python -m venv` under a temporary directory, installs torch==TORCH_VERSION, then
# `pip install -e .[test]` of this checkout with torch and every REQUIREMENT pinned as pip
# constraints (so the extras resolve around them), prints the versions it got and runs
# `python -m pytest -q` from the checkout root. The venv is deleted afterwards unless --keep is given.
# The exit status is pytest's. PyPI's Linux torch wheels are CUDA builds: pip pulls the nvidia-*
# wheels (~3 GB) next to torch; the suite runs on the CPU either way.
set -euo pipefail

keep=0
if [[ "${1:-}" == "--keep" ]]; then keep=1; shift; fi
if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,16p' "$0" >&2
    exit 2
fi
torch_version="$1"; shift
pins=("torch==${torch_version}")
while [[ $# -gt 0 && "$1" != "--" ]]; do pins+=("$1"); shift; done
if [[ "${1:-}" == "--" ]]; then shift; fi
pytest_args=("$@")

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/slo-torch-versions.XXXXXX")"
if [[ $keep -eq 0 ]]; then
    trap 'rm -rf "$work"' EXIT
else
    echo "venv kept at $work/venv" >&2
fi

printf '%s\n' "${pins[@]}" > "$work/pins.txt"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install -q --upgrade pip
"$venv_python" -m pip install -q -c "$work/pins.txt" "torch==${torch_version}"
"$venv_python" -m pip install -q -c "$work/pins.txt" -e "${root}[test]"

cd "$root"
unset PYTHONPATH
"$venv_python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "transformers", "accelerate", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
PY
"$venv_python" -m pytest -q "${pytest_args[@]}"
