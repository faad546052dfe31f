#!/bin/bash
# How fast does one organ's head learn from its own dataset, alone and beside the other datasets? Builds
# SUBSET projects of a phantom project (some training datasets, the same val/test sets, roots pointing
# back at the phantom's folders, so its files are read in place and never copied), prepares each into OUT, trains one method on it
# under the standard suite's budget, and prints the validation curve of one organ region. Used for the
# session-12 exposure analysis of DoDNet and the marginal baseline in docs/dodnet_investigation.md.
#
#   benchmarks/task_exposure.sh PROJECT OUT ORGAN "NAME METHOD DATASETS STEPS [OVERRIDES...]" ...
#
# DATASETS is a comma-separated list of training datasets, e.g.
#   benchmarks/task_exposure.sh bench_out/std7/data/project.yaml /tmp/exposure pancreas \
#     "dod1 dodnet pancreas 1000" "mh1 multihead pancreas 1000" "dod2 dodnet pancreas,liver 1000"
# Runs go one after another (each uses every core). Validation is the project's fully labelled val set when
# it has one (the phantom's 6 cases, the same for every subset and for the full project), else the held-out
# cases of the chosen datasets, which differ between subsets: then compare runs with the same DATASETS.
set -u
# the project's own venv first, so that python3 and unionseg are the ones it installed (unless one is active)
venv="$(CDPATH= cd -- "$(dirname "$0")/.." && pwd)/.venv/bin"
[ -z "${VIRTUAL_ENV:-}" ] && [ -d "$venv" ] && PATH="$venv:$PATH"
project=$1; out=$2; organ=$3; shift 3
mkdir -p "$out"
python3 -c 'import sys, yaml; from unionseg.benchmark import load_suite
yaml.safe_dump(dict(load_suite("standard").budget), sys.stdout)' > "$out/budget.yaml" || exit 1
for run in "$@"; do
  read -r name method datasets steps overrides <<< "$run"
  dir="$out/$name"
  mkdir -p "$dir"
  python3 - "$project" "$datasets" "$dir/project.yaml" <<'PY' || exit 1
import os
import sys
from pathlib import Path
import yaml
source, keep, target = Path(sys.argv[1]).resolve(), sys.argv[2].split(","), Path(sys.argv[3])
spec = yaml.safe_load(source.read_text())
names = [d["name"] for d in spec["datasets"] if d.get("role", "train") == "train"]
unknown = sorted(set(keep) - set(names))
if unknown:
    sys.exit(f"{source}: no training dataset {unknown} (it has {names})")
spec["datasets"] = [d for d in spec["datasets"] if d.get("role", "train") != "train" or d["name"] in keep]
for d in spec["datasets"]:
    # relative to the new project file (projects refuse absolute roots): the phantom's files, read in place
    d["root"] = os.path.relpath((source.parent / d["root"]).resolve(), target.parent.resolve())
spec["name"] = f"{spec['name']}-{'-'.join(keep)}"
target.write_text(yaml.safe_dump(spec, sort_keys=False))
PY
  unionseg prepare "$dir/project.yaml" > "$dir/prepare.log" 2>&1 || { echo "$name: prepare failed ($dir/prepare.log)"; exit 1; }
  # shellcheck disable=SC2086  # the overrides are separate words
  unionseg train "$dir/project.yaml" -m "$method" -c "$out/budget.yaml" steps="$steps" $overrides \
      -o "$dir/run" --quiet > "$dir/train.log" 2>&1 || { echo "$name: train failed ($dir/train.log)"; exit 1; }
  python3 - "$dir/run/summary.json" "$name" "$organ" <<'PY'
import json, sys
from pathlib import Path
path, name, organ = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
curve = [(row["step"], row.get(f"model/region:{organ}")) for row in json.loads(path.read_text())["history"]]
print(name, organ, " ".join(f"{step}:{dice:.2f}" for step, dice in curve if dice is not None))
PY
done
