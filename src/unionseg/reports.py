"""Text reports for the terminal (rich tables). No torch here."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unionseg.jsonfile import read_record
from unionseg.labels import BACKGROUND, REGION_PREFIX


def project_summary(project_path: str | Path, roots: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Taxonomy, annotated classes and case counts per split, as plain data.

    Loads the project, scans every dataset folder (structure only, no voxels) and splits the training
    datasets as training will.

    Args:
        project_path: the project file.
        roots: optional ``dataset name -> folder`` overrides.

    Raises:
        ConfigError: an invalid project file (names the file and the key).
        DataError: an unusable dataset folder (names the file at fault).
    """
    from unionseg.config import load_project, split_cases
    from unionseg.data.catalog import (
        check_label_map,
        scan_dataset,
        warn_shared_images,
        warn_training_on_test_folders,
    )

    # an evaluation-only project (one test set, for `evaluate -p`) is described too; it says it cannot train
    project = load_project(project_path, roots=roots, require_train=False)
    space = project.label_space
    datasets = []
    scans = []
    for spec in project.datasets:
        info = scan_dataset(spec.name, spec.root, spec.layout, spec.oracle_labels)
        scans.append((spec.name, spec.role, info))
        check_label_map(spec.name, info.declared_labels, spec.labels, spec.root / "dataset.json", space.names[1:],
                        spec.other, project.path)
        warn_training_on_test_folders(spec.name, spec.role, spec.root, info)
        space.warn_annotations(spec.name, project.path)
        ids = [c.case_id for c in info.cases]
        if spec.role == "train":
            split = split_cases(ids, spec.split, where=f"datasets.{spec.name}.", source=project.path)
            # with a role: val dataset, validation uses it alone: a training dataset's held-out cases are
            # neither trained nor validated on, which `val N` hid (prepare says "held out, unused"; helper-102)
            if any(d.role == "val" for d in project.datasets):
                counts = {"train": len(split["train"])}
                if split["val"]:
                    counts["held out (unused)"] = len(split["val"])
            else:
                counts = {"train": len(split["train"]), "val": len(split["val"])}
        else:
            counts = {spec.role: len(ids)}
        datasets.append({"name": spec.name, "role": spec.role, "layout": info.layout,
                         "labels": {int(k): v for k, v in spec.labels.items()}, "other": spec.other,
                         "annotated": list(spec.annotated), "counts": counts, "root": str(spec.root)})
    warn_shared_images(scans, project.path)
    classes = [{"id": i, "name": leaf.name, "part_of": leaf.part_of} for i, leaf in enumerate(space.leaves)]
    return {"project": project.name, "path": str(project.path), "classes": classes,
            "regions": {k: [space.names[i] for i in space.leaves_of(k)] for k in space.region_keys()},
            "datasets": datasets,
            "preprocessing": {"spacing": list(project.preprocessing.spacing),
                              "window": list(project.preprocessing.window)}}


def _label_map_lines(labels: Mapping[int, str], other: str | None) -> str:
    """A dataset's label map for the info table, one mapping per line (never cut), the values sent to background
    folded into one line of ranges (a multi-class file used for one organ maps dozens of them)."""
    lines = [f"{k}->{v}" for k, v in labels.items() if v != BACKGROUND]
    dropped = sorted(k for k, v in labels.items() if v == BACKGROUND)
    if dropped:
        runs: list[list[int]] = []
        for value in dropped:
            if runs and value == runs[-1][-1] + 1:
                runs[-1].append(value)
            else:
                runs.append([value])
        spans = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)
        lines.append(f"{spans}->{BACKGROUND}")
    if other:
        lines.append(f"other->{other}")
    return "\n".join(lines)


def print_project_info(project_path: Path, roots: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Print :func:`project_summary` as tables on stdout and return it (``unionseg info``)."""
    from rich.console import Console
    from rich.table import Table

    summary = project_summary(project_path, roots)
    # piped or captured output gets a wide console so that names are never cut to fit 80 columns
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]{summary['project']}[/bold]  ({summary['path']})")
    taxonomy = Table(title="classes (leaves)")
    for col in ("id", "leaf", "part of"):
        taxonomy.add_column(col)
    for c in summary["classes"]:
        taxonomy.add_row(str(c["id"]), c["name"], c["part_of"] or "")
    console.print(taxonomy)
    regions = Table(title="regions (scored as organs)", min_width=30)  # the title on one line
    regions.add_column("region")
    regions.add_column("leaves")
    for key, leaves in summary["regions"].items():
        regions.add_row(key[len(REGION_PREFIX):], ", ".join(leaves))
    console.print(regions)
    table = Table(title="datasets")
    for col in ("dataset", "role", "layout", "local -> global", "annotated", "cases"):
        table.add_column(col, overflow="fold")  # a narrow terminal wraps a name, never cuts it ("liver_tumo…")
    for d in summary["datasets"]:
        table.add_row(d["name"], d["role"], d["layout"], _label_map_lines(d["labels"], d.get("other")),
                      "\n".join(d["annotated"]),
                      ", ".join(f"{k} {v}" for k, v in d["counts"].items()))
    console.print(table)
    # where each dataset was read (after the roots file and --root): the table has no room for paths
    console.print("roots (NAME=DIR, as --root takes them): " + "; ".join(f"{d['name']}={d['root']}" for d in summary["datasets"]),
                  markup=False, highlight=False, soft_wrap=True)
    pre = summary["preprocessing"]
    console.print(f"preprocessing: spacing {pre['spacing']} mm, window {pre['window']} HU")
    if not any(d["role"] == "train" for d in summary["datasets"]):
        console.print("no dataset has role: train, so this project can score predictions (`unionseg evaluate "
                      "-p`) but not train", markup=False, highlight=False, soft_wrap=True)
    return summary


def model_summary(path: str | Path) -> dict[str, Any]:
    """What a model file holds and expects: method, classes and output channels, network and parameter count,
    the preprocessing its inputs get, the sliding-window settings, and where it comes from (``unionseg info
    MODEL.pt``)."""
    from unionseg.modelfile import load_model

    payload = load_model(path)
    config = payload.get("config") or {}
    provenance = payload.get("provenance") or {}
    network = payload["network"]
    while isinstance(network.get("network"), dict):  # a wrapper (channel selection) around the network
        network = network["network"]
    return {
        "path": str(path), "method": payload["method"], "output_form": payload["output_form"],
        "channels": list(payload["channels"]),
        "classes": [{"name": c["name"], "part_of": c.get("part_of")} for c in payload["label_space"]["classes"]],
        "project_datasets": [d["name"] for d in payload["label_space"].get("datasets", [])],
        "network": network, "parameters": int(sum(t.numel() for t in payload["state_dict"].values())),
        "preprocessing": payload["preprocessing"], "inference": payload["inference"],
        "training": {k: config.get(k) for k in ("steps", "expert_steps", "seed", "optim", "data", "select_on",
                                                "init_from")
                     if k in config},
        "provenance": provenance,
    }


#: an integer volume with at most this many distinct values, none negative, is read as a label map
LABEL_MAP_MAX_VALUES = 256
#: voxels per pass of :func:`image_summary`, so that a 600-slice label map is not copied whole as int64
_CHUNK = 1 << 22


def image_summary(path: str | Path) -> dict[str, Any]:
    """What an image file (NIfTI, NRRD, MHA) or DICOM series holds (``unionseg info IMAGE``): its grid (shape,
    spacing, orientation, origin, extent), and either its intensity range or, for a label map (integer
    voxels, or float ones holding whole numbers, none negative, at most :data:`LABEL_MAP_MAX_VALUES` values),
    each value's voxel count and
    volume; the class names and the model a label map of ``unionseg predict`` records. The values are what a
    project file's label map (``labels: {1: liver}``) maps.

    Raises:
        DataError: the file cannot be read as a 3D image (naming it and why).
    """
    import numpy as np

    from unionseg.data.catalog import declared_labels_of
    from unionseg.data.io import (
        nifti_description,
        nifti_label_names,
        parse_prediction_description,
        read_image,
    )

    path = Path(path)
    array, geometry = read_image(path)
    spacing = [float(v) for v in geometry.spacing]
    summary: dict[str, Any] = {
        "path": str(path), "shape": [int(n) for n in array.shape], "dtype": str(array.dtype),
        "spacing": spacing, "orientation": geometry.orientation(), "origin": [float(v) for v in geometry.origin],
        "extent_mm": [round(n * d, 1) for n, d in zip(array.shape, spacing, strict=False)],
    }
    voxel_ml = float(np.prod(spacing)) / 1000.0
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    flat = np.ravel(array, order="K")  # a view in the array's own order (a NIfTI's is Fortran: reshape copied)
    chunks = [flat[i:i + _CHUNK] for i in range(0, flat.size, _CHUNK)]  # no whole-volume temporaries
    # integer voxels, or float ones that all hold whole numbers (some tools store label maps as float32)
    whole = array.dtype.kind in "biu" or (
        array.dtype.kind == "f" and all(bool(np.all(np.mod(c, 1) == 0)) for c in chunks))
    if whole and low >= 0 and high < 65536:
        counts = np.zeros(int(high) + 1, np.int64)
        for chunk in chunks:
            counts += np.bincount(chunk.astype(np.int64), minlength=len(counts))
        values = np.flatnonzero(counts)
        if len(values) <= LABEL_MAP_MAX_VALUES:
            names = nifti_label_names(path) if path.is_file() else None
            mark = parse_prediction_description(nifti_description(path) or "") if path.is_file() else None
            near = declared_labels_of(path) if names is None and path.is_file() else None
            declared = near[1] if near is not None else {}
            summary["label_map"] = {
                "values": {int(v): {"voxels": int(counts[v]), "ml": round(int(counts[v]) * voxel_ml, 2),
                                    **({"name": names[v]} if names is not None and v < len(names) else {}),
                                    **({"declared": declared[int(v)]} if int(v) in declared else {})}
                           for v in values},
                "written_by_predict": mark is not None, "model": None if mark is None else mark.get("model"),
                "dataset_json": None if near is None else str(near[0]),
                # values dataset.json names that the file does not hold (a class absent from this case)
                "declared_absent": {k: v for k, v in sorted(declared.items()) if k not in set(values.tolist())},
            }
            return summary
    summary["intensity"] = {"min": float(low), "max": float(high),
                            "mean": float(array.mean(dtype=np.float64)) if array.size else 0.0}
    return summary


def print_probability_info(path: str | Path) -> dict[str, Any]:
    """``unionseg info`` on a probability map of ``unionseg predict`` (``case_probs.nii.gz``, 4D) or its channel
    list (``case_probs.json``): the grid and what each channel holds, read from the header and the list (no
    voxels). It was "a 3D volume is required" for the map and an unknown key of a project file for the list.

    Raises:
        DataError: the list cannot be read.
    """
    import json

    from unionseg.data.io import _nifti_header, strip_suffix
    from unionseg.errors import DataError

    path = Path(path)
    listing = path if path.suffix == ".json" else path.with_name(strip_suffix(path) + ".json")
    image = path.with_name(path.stem + ".nii.gz") if path.suffix == ".json" else path
    try:
        record = json.loads(listing.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the probability map's channel list ({exc})", listing) from None
    summary: dict[str, Any] = {"path": str(path), "channel_list": str(listing), "model": record.get("model"),
                               "channels": list(record.get("channels") or []),
                               "meaning": dict(record.get("meaning") or {})}
    header = _nifti_header(image) if image.is_file() else None  # the header alone: no voxels read
    if header is not None:
        summary["shape"] = [int(n) for n in header.get_data_shape()]
        summary["spacing"] = [float(v) for v in header.get_zooms()[:3]]
    shape = " x ".join(map(str, summary.get("shape", []))) or "its map not found beside it"
    print(f"{path}: a probability map of unionseg predict (model {summary['model']}), {shape}"
          + (f" at {' x '.join(f'{v:.4g}' for v in summary['spacing'])} mm" if "spacing" in summary else ""))
    for k, name in enumerate(summary["channels"]):
        meaning = summary["meaning"].get(name)
        print(f"  channel {k}: {name}" + (f" ({meaning})" if meaning else ""))
    return summary


def print_image_info(path: str | Path) -> dict[str, Any]:
    """Print :func:`image_summary` on stdout and return it."""
    from rich.console import Console

    s = image_summary(path)
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    out = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    size = " x ".join(map(str, s["shape"]))
    spacing = " x ".join(f"{v:.4g}" for v in s["spacing"])
    labels = s.get("label_map")
    kind = "a label map" if labels is not None else "an image"
    out(f"{s['path']}: {kind}, {size} voxels of {spacing} mm ({s['dtype']}), {s['orientation']}, "
        f"{' x '.join(f'{v:g}' for v in s['extent_mm'])} mm, origin "
        f"({', '.join(f'{v:.1f}' for v in s['origin'])}) mm")
    if labels is None:
        i = s["intensity"]
        out(f"intensities {i['min']:g} to {i['max']:g}, mean {i['mean']:.1f}")
        return s
    if labels["written_by_predict"]:
        out("written by unionseg predict" + (f" (model {labels['model']})" if labels["model"] else ""))
    where = f" (names from {labels['dataset_json']})" if labels["dataset_json"] else ""
    out(f"{len(labels['values'])} value(s){where}:")
    for value, facts in labels["values"].items():
        name = facts.get("name") or facts.get("declared")
        out(f"  {value}{f' {name}' if name else ''}: {facts['voxels']:,} voxels, {facts['ml']:g} mL")
    if labels["declared_absent"]:
        out("declared by dataset.json but not in this file: "
            + ", ".join(f"{k} {v}" for k, v in labels["declared_absent"].items()))
    return s


def print_model_info(path: Path, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Print :func:`model_summary` (``summary``, when already read) on stdout and return it."""
    import json

    from rich.console import Console

    s = summary if summary is not None else model_summary(path)
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    out = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    article = "an" if s["method"][:1] in "aeiou" else "a"
    out(f"{s['path']}: {article} {s['method']} model ({s['output_form']} outputs), {s['parameters']:,} parameters")
    parts = {c["name"]: [d["name"] for d in s["classes"] if d["part_of"] == c["name"]] for c in s["classes"]
             if not c["part_of"]}
    out("classes: " + "; ".join(f"{organ}" + (f" (with {', '.join(p)})" if p else "") for organ, p in parts.items()))
    out(f"output channels: {', '.join(s['channels'])}")
    if s["project_datasets"]:
        out(f"datasets of its project: {', '.join(s['project_datasets'])}")
    network = s["network"]
    if network.get("kind") == "ensemble":
        experts = network.get("experts", [])
        first = experts[0].get("backbone", {}) if experts else {}
        out(f"network: an ensemble of {len(experts)} experts, each {json.dumps(first)}")
    else:
        head = network.get("head", {})
        out(f"network: {json.dumps(network.get('backbone', {}))}"
            + (f", head {head.get('name')}" if isinstance(head, dict) and head else ""))
    pre = s["preprocessing"]
    # the grid holds a whole number of voxels per axis, so an image's own spacing is close to the target
    # (5.948 mm for a 6 mm target), not equal to it: prepare records each case's
    out(f"inputs are resampled to about {pre.get('spacing')} mm and windowed to {pre.get('window')} HU"
        + (", cropped to the body" if pre.get("crop_to_body") else "") + "; predictions go back to the input's grid")
    inf = s["inference"]
    out(f"sliding window: {inf.get('roi_size')} voxels, overlap {inf.get('overlap')}, {inf.get('sw_batch_size')} "
        f"window(s) per call, {inf.get('blend')} blending, threshold {inf.get('threshold')}")
    train = s["training"]
    if train:
        optim = train.get("optim") or {}
        out(f"training: {train.get('steps')} steps, seed {train.get('seed')}, {optim.get('name')} lr {optim.get('lr')} "
            f"({optim.get('schedule')}), checkpoint selected on {_selection_words(train.get('select_on'))}"
            + (f", shared experts {train['expert_steps']} steps" if train.get("expert_steps") else "")
            + (f", started from {train['init_from']}" if train.get("init_from") else ""))
    prov = s["provenance"]
    if prov:
        out(f"provenance: taken at step {prov.get('selected_at_step')}, config hash {prov.get('config_hash')}, "
            f"data fingerprint {prov.get('data_fingerprint')}")
        if prov.get("options"):
            out(f"method options: {json.dumps(prov['options'], sort_keys=True)}")
        processes = _processes_words(prov.get("processes"))  # absent from model files before session 36
        if processes:
            out(processes)
    return s


def _selection_words(select_on: str | None) -> str:
    """What a run's ``select_on`` compares, in words (``train`` prints "classes" / "organ regions")."""
    return "the organ regions" if select_on == "regions" else "every class, not only the organ regions"


def _print_shared_stages(run: Path) -> None:
    """For a run cut during its stages: which stages it finished and how far each shared expert got (their
    checkpoints live with the shared artefacts, where `--resume` picks them up)."""

    from unionseg.training.checkpoint import checkpoint_step
    from unionseg.training.trainer import SHARED_KEY

    path = run / "stages.json"
    if not path.is_file():
        return
    stages = read_record(path)
    finished = [s for s in stages if s != SHARED_KEY]
    if finished:
        print(f"stages finished: {', '.join(finished)}")
    shared = Path(stages.get(SHARED_KEY, "")) / "experts"
    if SHARED_KEY not in stages or not shared.is_dir():
        return
    for expert in sorted(p for p in shared.iterdir() if p.is_dir()):
        if (expert / "summary.json").is_file():
            state = "trained"
        elif (expert / "last.pt").is_file():
            step = checkpoint_step(expert / "last.pt")
            state = f"cut at step {step}, resumes from {expert / 'last.pt'}" if step is not None else \
                f"resumes from {expert / 'last.pt'}"
        else:
            state = "started, no checkpoint yet"
        print(f"shared expert {expert.name}: {state}")
    print("`unionseg train` with the same arguments and --resume goes on from there")


def _processes_words(processes: Any) -> str:
    """``trained on 2 processes (torchrun): ...`` from a summary's ``processes``, for a run that had more than
    one (the effective batch is data.batch_size times their number); ``""`` for one process or no record."""
    try:
        entries = [(int(p["from_step"]), int(p["world_size"])) for p in processes or []]
    except (KeyError, TypeError, ValueError):
        return ""
    if not entries or all(size == 1 for _, size in entries):
        return ""
    if len(entries) == 1:
        return f"trained on {entries[0][1]} processes (torchrun): an effective batch of {entries[0][1]} x data.batch_size"
    spans = ", ".join(f"{size} from step {step}" for step, size in entries)
    return (f"trained on a number of processes that changed on resume: {spans} (torchrun where more than one); "
            "the effective batch is data.batch_size times their number")


def print_run_info(run: Path) -> dict[str, Any]:
    """A run folder (``unionseg info RUN``): how far it got, then its model file as :func:`print_model_info`.

    Raises:
        CheckpointError: a folder that holds no run (no ``config.yaml``).
    """

    from unionseg.errors import CheckpointError

    if not (run / "config.yaml").is_file():
        # a benchmark's row folder (seed0/, ...) or its -o (runs/NAME/seedN/), a phantom's folder
        runs = sorted(str(p.parent.relative_to(run)) for depth in ("*", "*/*", "*/*/*")
                      for p in run.glob(f"{depth}/config.yaml"))
        projects = sorted(p.name for p in run.glob("*.yaml"))
        hint = (f"; it holds run folders ({', '.join(runs[:4])}{', ...' if len(runs) > 4 else ''}): give one"
                if runs else f"; it holds {', '.join(projects[:3])}: give the project file" if projects else "")
        if (run / "benchmark.json").is_file():  # a benchmark's -o: its comparison is the report
            report = run / "report.md"
            hint += (f"; it is a benchmark's folder, whose comparison is {report}" if report.is_file() else
                     "; it is a benchmark's folder, without a report yet (`unionseg benchmark` writes report.md "
                     "when its rows are done)")
        raise CheckpointError("not a run folder (no config.yaml); give a project file, a model file or the -o "
                              f"folder of `unionseg train`{hint}", run)
    summary_path = run / "summary.json"
    history_path = run / "validation.json"
    model: dict[str, Any] | None = None
    unreadable: CheckpointError | None = None
    if (run / "model.pt").is_file():
        try:
            model = model_summary(run / "model.pt")
        except CheckpointError as exc:  # raised after the run's state is said: a broken model hid it
            unreadable = exc
    if summary_path.is_file():
        summary = read_record(summary_path)
        step = summary.get("selected_at_step")
        if step is None and model is not None:  # a summary written before it recorded the step
            step = model["provenance"].get("selected_at_step")
        score = summary.get("best_val_mean_dice", float("nan"))
        chosen = (f"best validation mean Dice {score:.4f} (over {_selection_words(summary.get('selected_on'))})"
                  if score is not None else "not validated (no validation case): the last step's weights")
        print(f"{run}: a finished {summary.get('method')} run of {summary.get('steps')} steps; the model file was "
              f"taken at step {step}, {chosen}")
        processes = _processes_words(summary.get("processes"))
        if processes:
            print(processes)
    else:
        from unionseg.locking import FileLock
        from unionseg.training.checkpoint import checkpoint_progress

        lock = run / ".lock"
        holder = FileLock(lock, "the run folder").holder() if lock.is_file() else ""
        if holder.startswith("pid "):  # read from /proc/locks, without taking the lock: info writes nothing
            print(f"{run}: a run in progress, in {holder}; what follows is where it stood at its last record")
        history = read_record(history_path) if history_path.is_file() else []
        last = (", not validated yet" if not history
                else ", not validated (no validation case)" if history[-1].get("cases") == 0
                else f", last validated at step {history[-1]['step']}")
        if (run / "last.pt").is_file():
            step, sizes = checkpoint_progress(run / "last.pt")
            if step is None:  # it said "to resume from", and --resume then refused the file
                print(f"{run}: an unfinished run{last}; its checkpoint (last.pt) cannot be read (truncated or "
                      "corrupt): --resume refuses it; delete it to train again from step 0, or train into "
                      "another --out")
            else:
                print(f"{run}: an unfinished run{last}; a checkpoint (last.pt, step {step}) to resume from")
                # a torchrun run resumed with plain `unionseg train` would halve its effective batch: say how
                # many processes trained it (the summary says it for a finished run)
                processes = _processes_words([{"from_step": a, "world_size": b} for a, b in sizes])
                if processes:
                    now = sizes[-1][1]
                    print(processes + (f"; go on with the same torchrun command ({now} processes) and --resume"
                                       if now > 1 else ""))
        else:
            print(f"{run}: an unfinished run{last}; no checkpoint of its own yet")
            _print_shared_stages(run)
    if unreadable is not None:
        raise unreadable
    if model is None:
        print("no model file yet")
        return {"run": str(run)}
    return {"run": str(run), **print_model_info(run / "model.pt", model)}

