#!/usr/bin/env bash
# The path a new user takes, walked from nothing: a fresh virtual environment, the README's first
# install command exactly as written (no extras), then the first commands a user runs; then the
# same from the wheel that `python -m build` makes, installed in its place. CI runs
# it after the test suite (.ci/run); run it yourself the same way:
#
#     bash scripts/smoke.sh [WORK_DIR]      # default: a new folder under ${TMPDIR:-/tmp}
#
# It fails on a non-zero exit (or, for `plot` without its extra, on anything but the one-line
# refusal naming the extra), on any line of stderr that is a Python warning or a traceback, and
# on any step that runs past its time limit. Everything it makes stays in WORK_DIR (the venv,
# runs, corpus cache, kernel cache); the folder is removed when every step passed, and kept,
# with each step's output, when one failed.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d "${TMPDIR:-/tmp}/charlm-smoke.XXXXXX")}"
mkdir -p "$work"
work="$(cd "$work" && pwd)"
python="${PYTHON:-python3}"
install_limit="${SMOKE_INSTALL_LIMIT:-900}"  # seconds: the install may download torch
step_limit="${SMOKE_STEP_LIMIT:-240}"        # seconds for each command after it

failures=0
n=0
last=""  # WORK_DIR/NN-NAME of the latest step: its .out and .err

# A line of stderr that no normal run may print: a Python warning ("file.py:12: UserWarning: ..."),
# a traceback, an exception Python ignored, or an uncaught exception's last line.
BAD_STDERR='(^Traceback \(most recent call last\)|:[0-9]+: [A-Z][A-Za-z]*Warning: |^Exception ignored|^[A-Za-z_.]*(Error|Exception|Warning): )'

# step NAME EXPECTED_EXIT COMMAND...: run it in WORK_DIR with the step limit; check the exit
# code and stderr. The output is kept as WORK_DIR/NN-NAME.{out,err}.
step() {
  local name="$1" expected="$2" limit="$step_limit"
  shift 2
  if [ "$name" = install ]; then limit="$install_limit"; fi
  n=$((n + 1))
  local log="$work/$(printf %02d "$n")-$name"
  last="$log"
  local start=$SECONDS
  (cd "$work" && timeout --kill-after=10 "$limit" "$@") >"$log.out" 2>"$log.err"
  local rc=$? took=$((SECONDS - start))
  local problem=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    problem="took longer than ${limit}s"
  elif [ "$rc" -ne "$expected" ]; then
    problem="exit $rc, expected $expected"
  elif grep -qE "$BAD_STDERR" "$log.err"; then
    problem="a warning or traceback on stderr: $(grep -m1 -E "$BAD_STDERR" "$log.err")"
  fi
  if [ -n "$problem" ]; then
    failures=$((failures + 1))
    echo "smoke: FAIL $name (${took}s): $problem"
    echo "--- $name: last lines of stderr ($log.err)"
    tail -n 15 "$log.err"
    echo "---"
  else
    echo "smoke: ok   $name (${took}s)"
  fi
  return 0
}

# The README's first install command: the first ```bash block of its "Quick start" section.
install_command="$(awk '
  /^## Quick start/ { section = 1; next }
  section && /^## / { exit }
  section && /^```bash$/ { block = 1; next }
  block && /^```$/ { exit }
  block { print }
' "$repo/README.md")"
case "$install_command" in
  *"pip install"*) ;;
  *) echo "smoke: FAIL: no install command found in README.md's Quick start"; exit 1 ;;
esac
echo "smoke: in $work"
echo "smoke: README install command: $install_command"

"$python" -m venv "$work/venv" || { echo "smoke: FAIL: $python -m venv"; exit 1; }
export PATH="$work/venv/bin:$PATH" VIRTUAL_ENV="$work/venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# Nothing outside WORK_DIR: runs, the corpus cache and the compiled kernels stay in it.
export CHARLM_RUNS_DIR="$work/runs" CHARLM_DATA_DIR="$work/cache" CHARLM_KERNEL_DIR="$work/kernels"
unset CHARLM_MIRROR CHARLM_DEBUG PYTHONWARNINGS PYTHONPATH

# The install runs in the clone (its `pip install -e .` installs this checkout); `python3` is the
# fresh venv's.
step install 0 bash -c "cd '$repo' && $install_command"
if [ "$failures" -ne 0 ]; then
  echo "smoke: the install failed; the commands were not run (see $work)"
  exit 1
fi

step help 0 charlm --help
step data-list 0 charlm data list
# The default model on the first 50,000 characters of the built-in python-docs text (no network).
small=(--corpus python-docs --max-tokens 50000 --log-every 5)
step train 0 charlm train "${small[@]}" --max-steps 20 --eval-every 10 --out "$work/runs/one"
step train-nproc-2 0 charlm train --nproc 2 "${small[@]}" --max-steps 10 --out "$work/runs/two"
step generate 0 charlm generate --checkpoint "$work/runs/one" --prefix "The " --length 200 --seed 1
if grep -q "<unk>" "$last.out"; then
  failures=$((failures + 1))
  echo "smoke: FAIL generate: the sample holds <unk>"
fi
step eval-json 0 bash -c 'charlm eval perplexity --checkpoint runs/one --json > eval.json &&
  python3 -c "import json; r = json.load(open(\"eval.json\")); assert r[\"perplexity\"] > 1, r"'
step plot-without-extra 1 charlm plot
refusal="charlm: error: charlm plot needs matplotlib: pip install 'charlm-rnn[plot]'"
if [ "$(cat "$last.err")" != "$refusal" ]; then
  failures=$((failures + 1))
  echo "smoke: FAIL plot-without-extra: stderr is not the one line naming the extra: $(head -c 300 "$last.err")"
fi

# The package as built for others: `python -m build` makes an sdist and, from it, a wheel (of a
# copy of the checkout, so nothing is written into it); the wheel replaces the editable install,
# and the user path runs again from what it installed (package data: corpora.toml, the C kernel).
if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
  mkdir -p "$work/src"
  (cd "$repo" && git ls-files -z -co --exclude-standard | xargs -0 tar cf -) | tar xf - -C "$work/src"
else
  cp -a "$repo/." "$work/src"
fi
step build 0 bash -c "python3 -m pip install -q build && python3 -m build --outdir '$work/dist' '$work/src'"
step sdist-contents 0 python3 - "$work/dist" <<'PY'
import glob, sys, tarfile
[sdist] = glob.glob(f"{sys.argv[1]}/*.tar.gz")
names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
need = {"charlm/data/corpora.toml", "charlm/model/fastgru_kernel.c", "configs/timemachine-gru.toml",
        "tests/conftest.py", "tests/helpers.py", "scripts/smoke.sh", "README.md", "pyproject.toml"}
assert need <= names, f"{sdist} lacks {sorted(need - names)}"
PY
step install-wheel 0 bash -c "python3 -m pip uninstall -q -y charlm-rnn && python3 -m pip install -q '$work'/dist/*.whl"
step wheel-files 0 python3 - <<'PY'
import shutil
from pathlib import Path
import charlm
from charlm.model import ckernel
home = Path(charlm.__file__).parent
assert "site-packages" in home.parts, f"charlm imported from {home}, not the installed wheel"
for name in ("data/corpora.toml", "model/fastgru_kernel.c"):
    assert (home / name).is_file(), f"the wheel lacks charlm/{name}"
if shutil.which("cc") or shutil.which("gcc"):
    assert ckernel.status() == "compiled C loops + MKL packed GEMM", ckernel.status()
PY
step wheel-train 0 charlm train "${small[@]}" --max-steps 10 --out "$work/runs/wheel"
step wheel-generate 0 charlm generate --checkpoint "$work/runs/wheel" --prefix "The " --length 50 --seed 1

if [ "$failures" -ne 0 ]; then
  echo "smoke: $failures step(s) failed; everything is kept in $work"
  exit 1
fi
echo "smoke: every step passed"
if [ -z "${1:-}" ]; then rm -rf "$work"; fi
