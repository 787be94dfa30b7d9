#!/usr/bin/env bash
# Exercise every CUDA path of charlm on this machine and print a pass/fail table (Markdown, for
# docs/BENCHMARKS.md). About 8 minutes on one H200; on a machine without CUDA every GPU row is
# SKIP and it exits 0 (CI runs it to check that it starts). What each row does:
# scripts/gpu_check.py's docstring.
#
#   scripts/gpu_check.sh [--out DIR] [--budget SECONDS] [--suite] [--json]
#
# $PYTHON picks the interpreter (default: python3), which must have charlm and its test extras
# installed (pip install -e '.[test]').
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
