#!/usr/bin/env bash
# Verify lightning-nfk on one CUDA GPU in under 8 minutes (issue 13, "Ready to verify on a GPU"):
#   tests    python -m pytest -m cuda tests/cuda      (strategies and energies against the CPU,
#            TF32 left on by the caller, host syncs, the CLI in each precision, distillation)
#   bench    python benchmarks/bench_kernel.py --device cuda --quick
#   teacher  python benchmarks/gpu_teacher_fit.py --device cuda   (WRN-40-2, 5,000 CIFAR-10
#            images, k = 20: the default memory budget against a 1 GiB one)
# Every step runs under `timeout`, inside an overall budget of 460 s; a step that fails or
# times out is reported and the next one still runs. The summary goes to stdout and, when
# $OUT is set, to $OUT/gpu_check.txt, with each step's full log beside it. Exit status: 0
# when every step passed.
#
#   bash benchmarks/gpu_check.sh             # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere (CPU): list the steps, check that
#                                            # every script parses and every module imports
#
# PYTHON chooses the interpreter (default: python3, else python). The CLI tests need the
# package's dependencies (jsonargparse[signatures] among them): the preflight names any
# that are missing. CIFAR-10 is read from shared/data/cifar10_jpeg.npz in the checkout or
# beside it (random images of its shape otherwise, said in the output).
set -euo pipefail

usage="usage: bash benchmarks/gpu_check.sh [--dry-run]"
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg'; $usage" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# the CLI tests run `python -m lightning_nfk` from temporary folders: the checkout must be
# importable from anywhere (where the package is not installed)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

TOTAL_BUDGET=460 # seconds, all steps together (the check must end within 8 minutes)
STEPS=(tests bench teacher)
declare -A BUDGET=([tests]=200 [bench]=100 [teacher]=150)
declare -A COMMAND=(
  [tests]="$PYTHON -m pytest -m cuda tests/cuda -q -rfE --tb=short -p no:cacheprovider"
  [bench]="$PYTHON benchmarks/bench_kernel.py --device cuda --quick"
  [teacher]="$PYTHON benchmarks/gpu_teacher_fit.py --device cuda --examples 5000 --max-seconds 55"
)
declare -A STATUS=() ELAPSED=()

# the summary and the steps' logs: in $OUT when set (a dry run keeps no logs elsewhere)
LOGDIR="${OUT:-}"
SUMMARY=/dev/null
open_logs() {
  if [[ -z "$LOGDIR" ]] && ((!dry_run)); then
    LOGDIR="$(mktemp -d)"
  fi
  if [[ -n "$LOGDIR" ]]; then
    mkdir -p "$LOGDIR"
    SUMMARY="$LOGDIR/gpu_check.txt"
    : >"$SUMMARY"
  fi
}

say() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

# -- dry run: what would run, and does all of it load? ------------------------------------------
if ((dry_run)); then
  open_logs
  say "# gpu_check.sh --dry-run ($(date -u +%Y-%m-%dT%H:%MZ)): nothing runs on a GPU"
  say ""
  say "Steps of a GPU run (overall budget ${TOTAL_BUDGET} s):"
  for step in "${STEPS[@]}"; do
    say "  $step (timeout ${BUDGET[$step]} s): ${COMMAND[$step]}"
  done
  say ""
  failures=0
  check() { # name command...: run a check; report ok (or its own ok lines), else its output
    local name=$1 out
    shift
    if out="$("$@" 2>&1)"; then
      if grep -q '^ok ' <<<"$out"; then say "$(grep '^ok ' <<<"$out")"; else say "ok    $name"; fi
    else
      say "FAIL  $name"
      say "$out"
      failures=$((failures + 1))
    fi
  }
  check "bash -n benchmarks/gpu_check.sh" bash -n "$REPO/benchmarks/gpu_check.sh"
  # one interpreter: the modules the steps import, then each script's own argument parser
  check "imports, and the scripts' options" "$PYTHON" - <<'EOF'
import contextlib
import io
import runpy
import sys

import jsonargparse, pytorch_lightning, torchmetrics, torchvision, yaml  # noqa: F401
import lightning_nfk.callbacks, lightning_nfk.cli, lightning_nfk.data  # noqa: F401
import lightning_nfk.kernel, lightning_nfk.models  # noqa: F401
import tests.cuda.gpu, tests.helpers.processes  # noqa: F401

print("ok    imports: lightning_nfk, its dependencies, the CUDA tests' helpers")
for script, flags in (
    ("benchmarks/bench_kernel.py", ("--device", "--quick")),
    ("benchmarks/gpu_teacher_fit.py", ("--device", "--examples", "--max-seconds")),
):
    sys.argv, text = [script, "--help"], io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    missing = [flag for flag in flags if flag not in text.getvalue()]
    if missing:
        sys.exit(f"{script} has no option {missing}:\n{text.getvalue()}")
    print(f"ok    {script} loads and parses {', '.join(flags)}")
EOF
  collected="$("$PYTHON" -m pytest --collect-only -q -m cuda tests/cuda -p no:cacheprovider 2>&1)" || true
  count="$(grep -c '::' <<<"$collected" || true)"
  if ((count > 0)); then
    say "ok    pytest --collect-only -m cuda tests/cuda: $count tests collected"
  else
    say "FAIL  pytest --collect-only -m cuda tests/cuda collected no test:"
    say "$collected"
    failures=$((failures + 1))
  fi
  say ""
  if ((failures)); then
    say "dry run: $failures check(s) failed"
    exit 1
  fi
  say "dry run: every check passed"
  exit 0
fi

# -- preflight ----------------------------------------------------------------------------------
if ! header="$("$PYTHON" - <<'EOF'
import importlib.util
import sys

import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch.cuda.is_available() is False: no CUDA GPU here "
             "(use --dry-run to check the scripts on a CPU).")
missing = [m for m in ("jsonargparse", "docstring_parser", "typeshed_client", "yaml",
                       "torchvision", "torchmetrics", "pytorch_lightning", "matplotlib", "pytest")
           if importlib.util.find_spec(m) is None]
print(f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"Python {sys.version.split()[0]}")
if missing:
    print("missing Python packages (the steps that need them will fail): " + ", ".join(missing))
EOF
)"; then
  exit 1 # the reason is on stderr
fi
open_logs
DEADLINE=$((SECONDS + TOTAL_BUDGET))
say "# gpu_check.sh ($(date -u +%Y-%m-%dT%H:%MZ), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown))"
say "$header"

# -- the steps ----------------------------------------------------------------------------------
for step in "${STEPS[@]}"; do
  budget=${BUDGET[$step]}
  left=$((DEADLINE - SECONDS))
  ((budget > left)) && budget=$left
  if ((budget < 10)); then
    STATUS[$step]="skipped: the overall budget is spent"
    ELAPSED[$step]=0
    continue
  fi
  echo "== $step (timeout ${budget} s): ${COMMAND[$step]}"
  start=$SECONDS
  set +e
  # shellcheck disable=SC2086  # the command is a word list
  timeout --kill-after=10 "$budget" ${COMMAND[$step]} 2>&1 | tee "$LOGDIR/$step.log"
  rc=${PIPESTATUS[0]}
  set -e
  ELAPSED[$step]=$((SECONDS - start))
  case $rc in
    0) STATUS[$step]="passed" ;;
    124 | 137) STATUS[$step]="TIMED OUT after ${budget} s" ;;
    *) STATUS[$step]="FAILED (exit status $rc)" ;;
  esac
done

# -- summary ------------------------------------------------------------------------------------
say ""
say "| step | status | seconds | command |"
say "|---|---|---|---|"
failed=0
for step in "${STEPS[@]}"; do
  say "| $step | ${STATUS[$step]} | ${ELAPSED[$step]} | \`${COMMAND[$step]#"$PYTHON" }\` |"
  [[ ${STATUS[$step]} == passed ]] || failed=1
done
say ""
say "Total: ${SECONDS} s."
if [[ -f "$LOGDIR/tests.log" ]]; then
  say ""
  say "## CUDA tests"
  say "$(grep -E '^(FAILED|ERROR) | in [0-9.]+s( \(.*\))?$' "$LOGDIR/tests.log" || echo '(no pytest summary: see tests.log)')"
fi
for step in bench teacher; do
  if [[ -f "$LOGDIR/$step.log" ]]; then
    say ""
    say "## ${COMMAND[$step]#"$PYTHON" }"
    say "$(cat "$LOGDIR/$step.log")"
  fi
done
say ""
say "Logs: $LOGDIR/{tests,bench,teacher}.log"
exit $failed
