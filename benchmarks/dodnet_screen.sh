#!/bin/bash
# Screen task-conditioned settings on validation: several `unionseg train` runs at once (one GPU holds many of
# these small runs), then each run's validation region Dice per step. Used for the session-8 DoDNet screen in
# docs/dodnet_investigation.md.
#
#   benchmarks/dodnet_screen.sh PROJECT OUT_DIR "NAME STEPS OVERRIDES..." ["NAME STEPS OVERRIDES..." ...]
#
# e.g. benchmarks/dodnet_screen.sh bench_out/std2/data/project.yaml /tmp/screen \
#        "slow 3000 optim.lr=0.005 options.cross_task_weight=0.25" "paper 3000"
# Every run uses the standard suite's budget unless an override says otherwise; METHOD=multihead (or
# conditional) screens another member of the family.
set -u
# the project's own venv first, so that python3 and unionseg are the ones it installed (unless one is active)
venv="$(CDPATH= cd -- "$(dirname "$0")/.." && pwd)/.venv/bin"
[ -z "${VIRTUAL_ENV:-}" ] && [ -d "$venv" ] && PATH="$venv:$PATH"
project=$1; out=$2; shift 2
mkdir -p "$out"
# the standard suite's budget itself, so the screen cannot drift from the comparison it feeds
python3 -c 'import sys, yaml; from unionseg.benchmark import load_suite
yaml.safe_dump(dict(load_suite("standard").budget), sys.stdout)' > "$out/budget.yaml" || exit 1
for run in "$@"; do
  read -r name steps overrides <<< "$run"
  # shellcheck disable=SC2086  # the overrides are separate words
  ( unionseg train "$project" -m "${METHOD:-dodnet}" -c "$out/budget.yaml" steps="$steps" $overrides \
      -o "$out/$name" --quiet > "$out/$name.log" 2>&1; echo "$name: exit $?" ) &
done
wait
for run in "$@"; do
  read -r name _ <<< "$run"
  python3 - "$out/$name/summary.json" "$name" <<'PY'
import json, sys
from pathlib import Path
path, name = Path(sys.argv[1]), sys.argv[2]
if not path.is_file():
    sys.exit(print(f"{name}: no summary (see {path.parent}.log)"))
for row in json.loads(path.read_text())["history"]:
    dice = {k.split(":")[-1]: round(v, 2) for k, v in row.items() if "/region:" in k}
    print(name, row["step"], dice)
PY
done
