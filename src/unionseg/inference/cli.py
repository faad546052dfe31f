"""``unionseg predict MODEL INPUT... -o OUTDIR``: label maps for files, folders and DICOM series."""

from __future__ import annotations

import shlex
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from unionseg.errors import DataError, OutputExistsError, UnionsegError, and_more, listing
from unionseg.jsonfile import check_writable


def collect_inputs(inputs: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(case name, path)`` for every image among files, folders of images and DICOM series folders.

    The case name is the file name without its suffix and without nnU-Net's channel tag ``_0000``
    (``imagesTs/case_001_0000.nii.gz`` -> ``case_001``), so that predictions carry their label files' names.

    Raises:
        UnionsegError: a missing input, a folder without images, or two inputs with the same case name
            (their outputs would overwrite each other).
    """
    from unionseg.data.catalog import image_key, list_image_files
    from unionseg.data.io import IMAGE_SUFFIXES, is_dicom_file, strip_suffix, suffix_of

    def series(folder: Path) -> tuple[str, Path]:
        name = folder.resolve().name  # '.' or 'series/..' is named by the folder it stands for
        if not name:
            raise UnionsegError("a DICOM series at the file system's root has no name to give its prediction; "
                                "move it into a folder", folder)
        return name, folder

    found: list[tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise UnionsegError("input not found", path)
        if path.is_dir():
            files = list_image_files(path)
            if not files:
                inside = [d for d in ("imagesTs", "imagesTr") if (path / d).is_dir()]
                hint = f"; a dataset root? its images are in {' or '.join(str(path / d) for d in inside)}" if inside \
                    else _subfolder_hint(path)
                raise UnionsegError(f"no images in this folder ({', '.join(IMAGE_SUFFIXES)} or a DICOM series){hint}",
                                    path)
            found.extend(series(p) if p.is_dir() else (image_key(p), p) for p in files)
        elif is_dicom_file(path):
            found.append(series(path.parent))  # one file of a series stands for its folder
        else:
            found.append((image_key(path), path))
    # nnU-Net's multi-channel inputs: several cases that each have _0000 and more 4-digit channels (one name
    # with _0000, _0001, ... alone may be a numbered series of scans, and is predicted as such)
    channels = {name for name, path in found if path.is_file() and strip_suffix(path).endswith("_0000")}
    extra = [(base, tag, path) for name, path in found for base, _, tag in [name.rpartition("_")]
             if base in channels and len(tag) == 4 and tag.isdigit()]
    if len({base for base, _, _ in extra}) >= 2:
        base, tag, path = extra[0]
        raise UnionsegError(f"nnU-Net channel {tag} of case {base!r}: unionseg models read one CT channel, "
                            f"the _0000 file; give only those (e.g. {base}_0000{suffix_of(path)})", path)
    seen: dict[str, Path] = {}
    for name, path in found:
        if name in seen and seen[name].resolve() != path.resolve():
            raise UnionsegError(f"two inputs share the case name {name!r} ({seen[name]} and {path}); "
                                "predict them into different output folders", path)
        seen[name] = path
    unique: dict[str, Path] = {}
    for name, path in found:
        unique.setdefault(name, path)
    return list(unique.items())


def _subfolder_hint(folder: Path) -> str:
    """What to say when ``folder`` holds no image but its sub-folders do (a folder per patient or series):
    predict reads one level, so name them."""
    from unionseg.data.catalog import list_image_files

    def visible(parent: Path) -> list[Path]:
        return [d for d in sorted(parent.iterdir()) if d.is_dir() and not d.name.startswith(".")]

    try:
        subfolders = visible(folder)
        held = [d for d in subfolders if list_image_files(d, warn=False)]
        glob, level = f"{shlex.quote(str(folder))}/*", f"{len(held)} of its sub-folders"
        if not held:  # a PACS export: a folder per patient, each holding its series folders (a bounded look)
            held = [g for d in subfolders[:50] for g in visible(d)[:20] if list_image_files(g, warn=False)]
            glob, level = f"{shlex.quote(str(folder))}/*/*", "its sub-sub-folders"  # not counted: the look is bounded
    except OSError:
        return ""
    if not held:
        return ""
    from unionseg.data.catalog import image_key

    shown = ", ".join(str(d.relative_to(folder)) for d in held[:3]) + (", ..." if len(held) > 3 else "")
    names = [image_key(f) if f.is_file() else f.name for d in held for f in list_image_files(d, warn=False)]
    if len(set(names)) == len(names):
        return (f"; {level} hold images ({shown}), and predict reads one folder level: pass "
                f"them, e.g. {glob}")
    # a folder per patient with the same file names (ct.nii.gz, or series folders named alike): one output
    # folder per sub-folder
    return (f"; {level} hold images ({shown}), with the same names, and predict reads one "
            f"folder level and names outputs by file or series folder: predict each into an output folder of its "
            f"own, e.g. for d in {shlex.quote(str(folder))}/*/; do unionseg predict MODEL \"$d\"{'*/' if glob.endswith('/*/*') else ''} "
            f"-o \"OUT/$(basename \"$d\")\"; done")


#: seconds a temporary file must have stood unchanged before a later predict removes it: a writer on another
#: machine (whose process id means nothing here) writes its file steadily, so a minute of silence is a death
STALE_AFTER_S = 60.0


def remove_stale_temporaries(output: Path, names: Sequence[str], probabilities: bool) -> int:
    """Remove the temporary files (``.<file>.<pid>.tmp...``) that a killed predict (SIGKILL, power cut) left
    beside the outputs of these cases: their process is gone and they have not changed for
    :data:`STALE_AFTER_S`. Returns how many were removed."""
    from unionseg.locking import remove_dead_temporaries

    if not output.is_dir():
        return 0
    return sum(remove_dead_temporaries(output / file, STALE_AFTER_S)
               for name in names for file in output_files(name, probabilities))


def output_files(name: str, probabilities: bool) -> list[str]:
    """The file names ``predict`` writes for case ``name``."""
    return [f"{name}.nii.gz", *([f"{name}_probs.nii.gz", f"{name}_probs.json"] if probabilities else [])]


#: what each of a case's output files is, in :func:`output_files` order
OUTPUT_KINDS = ("labels", "probabilities", "channels")


def written_by_predict(path: Path, check_voxels: bool = False, kind: str | None = None) -> bool:
    """Whether ``path`` is a file ``unionseg predict`` wrote (its NIfTI header description, or the
    ``written_by`` of a probability map's channel list): ``--skip-existing`` passes only those as done, so
    that ``-o labelsTr`` never takes ground truth of the same name for a finished prediction.

    ``kind``: the file must be that output (:data:`OUTPUT_KINDS`): where case ``x`` puts its probability
    map, ``x_probs.nii.gz``, the label map of an input named ``x_probs`` is predict's too, but not ``x``'s.
    ``check_voxels``: a label map must also hold the voxels its mark's CRC-32 names, i.e. not have been
    edited since (a viewer that re-saves a corrected map keeps the description); asked before a file is
    replaced.
    """
    from unionseg.data.io import (
        labels_crc32,
        nifti_description,
        parse_prediction_description,
        predict_kind,
        read_image,
    )

    found = predict_kind(path)
    if found is None or (kind is not None and found != kind):
        return False
    if not check_voxels or found != "labels":
        return True
    mark = parse_prediction_description(nifti_description(path) or "")
    if mark is None:
        return False
    try:
        voxels, _ = read_image(path)
    except UnionsegError:
        return False
    return labels_crc32(voxels) == mark["crc32"]  # the CRC predict would give these voxels


def model_of(path: Path) -> str | None:
    """The model id a label map's mark records (None: no mark, or a mark from before models were recorded)."""
    from unionseg.data.io import nifti_description, parse_prediction_description

    mark = parse_prediction_description(nifti_description(path) or "")
    return None if mark is None else mark.get("model")


def _model_of_channels(path: Path) -> str | None:
    """The model id a probability map's channel list records (None: none recorded, or unreadable)."""
    import json

    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def stale_probabilities(output: Path, names: Sequence[str]) -> list[str]:
    """The probability maps (and channel lists) predict wrote earlier for ``names`` in ``output``: a run without
    ``--probabilities`` that writes those cases' label maps leaves them beside maps they may not match."""
    from unionseg.data.io import predict_kind

    return [f for name in names for f, kind in zip(output_files(name, True)[1:], OUTPUT_KINDS[1:], strict=True)
            if (output / f).exists() and predict_kind(output / f) == kind]


def check_same_model(output: Path, model: Path, names: Sequence[str], probabilities: bool) -> None:
    """Refuse to finish a batch whose finished (or half-written) cases another model wrote: their label maps'
    marks record the model (``--skip-existing`` would otherwise mix two models' outputs in one folder, or
    replace another model's map).

    Raises:
        UnionsegError: naming the first such file, the model its mark records and this one.
    """
    import warnings

    from unionseg.errors import CheckpointError, UnionsegWarning
    from unionseg.modelfile import model_id

    try:
        this = model_id(model)
    except CheckpointError:
        return  # an unreadable model file is named when it is loaded, with the reason

    def first(paths: list[Path]) -> str:
        more = and_more(len(paths), 1).strip()
        return f"{paths[0].name} ({more})" if more else paths[0].name

    maps = [output / output_files(name, probabilities)[0] for name in names]
    recorded = {path: model_of(path) for path in maps if path.exists()}
    # a probability map's channel list records its model too (since it did): a map beside another model's
    # label map (an --overwrite without --probabilities left it) is not the finished case it looks like
    lists = [output / output_files(name, True)[2] for name in names] if probabilities else []
    recorded.update((path, who) for path in lists if path.exists() and (who := _model_of_channels(path)))
    unnamed = [path for path, who in recorded.items() if who is None]
    if unnamed:  # marks of a release that did not record the model: taken as this model's, said once
        warnings.warn(f"{output}: {first(unnamed)} carries no model id (an earlier unionseg wrote it), so "
                      f"--skip-existing cannot check that {model} wrote it; it is taken as done", UnionsegWarning,
                      stacklevel=2)
    foreign = [path for path, who in recorded.items() if who is not None and who != this]
    if foreign:
        raise UnionsegError(f"--skip-existing: {first(foreign)} was written by model {recorded[foreign[0]]}, not "
                            f"by {model} (model {this}); finishing this batch would mix two models' outputs: "
                            "predict into another folder, or pass --overwrite to replace them", output)


def check_output_dir(outdir: Path, cases: Sequence[tuple[str, Path]], probabilities: bool = False,
                     overwrite: bool = False, redo: Collection[str] = (), skip_existing: bool = False) -> None:
    """Refuse an output folder that is a file, is an input folder, lies inside a DICOM series folder, would
    overwrite an input file, or (without ``overwrite``) already holds a file the prediction would replace:
    MSD images and labels share their names, so ``-o labelsTr`` would otherwise replace ground truth. The
    cases named in ``redo`` (partial outputs of an interrupted run) may replace their own files.

    Raises:
        UnionsegError: naming the output folder and the input or files at risk.
    """
    from unionseg.data.io import KIND_WORDS, predict_kind

    if outdir.exists() and not outdir.is_dir():
        raise UnionsegError("output exists and is not a folder; -o takes a folder", outdir)
    out = outdir.resolve()
    for name, path in cases:
        src = path.resolve()
        folder = src if src.is_dir() else src.parent
        if out == folder:
            raise UnionsegError(f"output folder is the input folder of {path}; choose another -o", outdir)
        if src.is_dir() and out.is_relative_to(src):
            raise UnionsegError(f"output folder lies inside the DICOM series folder {path}; choose another -o",
                                outdir)
        if (out / f"{name}.nii.gz") == src:
            raise UnionsegError(f"the output would overwrite the input {path}", outdir)
    owner: dict[str, tuple[str, str]] = {}
    for name, _ in cases:
        for f in output_files(name, probabilities):
            # e.g. inputs x and x_probs with --probabilities: both would write x_probs.nii.gz; names that
            # differ only in case are one file on macOS and Windows file systems, which map letters one to
            # one (lower(), not casefold(): "straße" and "strasse" are two files there)
            key = f.lower()
            if key in owner:
                other, other_f = owner[key]
                same = f"write {f}" if f == other_f else f"write {other_f} and {f}, one file where case is ignored"
                raise UnionsegError(f"cases {other!r} and {name!r} would both {same}; rename one input or "
                                    "predict them into different output folders", outdir)
            owner[key] = (name, f)
    if overwrite or not out.is_dir():
        return
    existing = [f for name, _ in cases if name not in redo
                for f in output_files(name, probabilities) if (out / f).exists()]
    if existing:
        shown = listing(existing)
        if skip_existing:
            kinds = {f: kind for name, _ in cases for f, kind in zip(output_files(name, probabilities), OUTPUT_KINDS,
                                                                     strict=False)}
            found = {f: predict_kind(out / f) for f in existing}
            misplaced = [f for f in existing if found[f] is not None and found[f] != kinds[f]]
            unknown = [f for f in existing if f not in misplaced
                       and not written_by_predict(out / f, check_voxels=True, kind=kinds[f])] or existing
            if misplaced:
                f = misplaced[0]
                raise UnionsegError(f"the output folder already holds {f}, where this run would write a "
                                    f"{KIND_WORDS[kinds[f]]}, but it is predict's {KIND_WORDS[found[f] or '']} "
                                    "(another input's output of that name: inputs x and x_probs with "
                                    "--probabilities?); nothing was written: predict those inputs into different "
                                    "output folders", outdir)
            raise UnionsegError(f"the output folder already holds {listing(unknown)}, not recognised as predict's "
                                "unedited outputs (no 'unionseg predict' mark, or voxels changed since: ground "
                                "truth, another tool's files, a map corrected in a viewer, or outputs of an older "
                                "unionseg, which did not mark them); nothing was written: pass --overwrite to "
                                "replace them, or choose another -o", outdir)
        if not any(written_by_predict(out / f) for f in existing):  # ground truth, as in a labelsTr folder
            raise UnionsegError(f"the output folder already holds {shown}, without predict's mark (ground truth "
                                "of the same names, another tool's files, or outputs of a unionseg from before "
                                "the mark); nothing was written: choose another -o (or pass --overwrite to replace "
                                "them)", outdir)
        raise UnionsegError(f"the output folder already holds {shown}; nothing was written: pass --overwrite to "
                            "replace them, --skip-existing to predict only the cases not done yet, or choose "
                            "another -o", outdir)


def predict_folder(
    model: str | Path,
    inputs: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    device: str = "auto",
    tta: bool = False,
    probabilities: bool = False,
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    overwrite: bool = False,
    skip_existing: bool = False,
    keep_going: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Predict images, folders of images and DICOM series folders into ``output``: what ``unionseg predict``
    does, from Python (one label map ``<case>.nii.gz`` per case, the label tables for ITK-SNAP and 3D Slicer
    beside them, every refusal of the command). The options are the command's flags (``skip_existing`` is
    ``--skip-existing``, ``progress=False`` is ``--quiet``), and its messages name the flags.

    For one image into a file name of your choice, use :meth:`Predictor.predict_file`.

    Args:
        model: the model file (``RUN/model.pt``).
        inputs: an image file, a folder of them (nnU-Net's ``case_0000`` names are read as ``case``), a DICOM
            series folder, or a list of these.
        output: the output folder (made if missing).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        tta: mirror test-time augmentation (8 x slower).
        probabilities: also write ``<case>_probs.nii.gz`` and its ``.json`` channel list.
        overlap: the sliding window's overlap (default: the model file's).
        sw_batch_size: windows per network call (default: the model file's).
        overwrite: replace outputs of the same names (never the inputs).
        skip_existing: leave out the cases whose outputs are already there (after an interruption).
        keep_going: report an unreadable input and go on; the call raises at the end, naming each such input.
        progress: a progress bar and one line per case on stderr.

    Returns:
        The label maps this call wrote, in the order of the cases (cases skipped by ``skip_existing`` are
        not in it).

    Raises:
        UnionsegError: a refused input or output, named (an existing output without ``overwrite`` or
            ``skip_existing`` among them); no input; with ``keep_going``, inputs that were left out (the
            error's ``written`` attribute then lists the label maps that were written).
        DataError: an unreadable input (without ``keep_going``).
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn

    from unionseg.config import is_device_name
    from unionseg.data.io import IMAGE_SUFFIXES, KIND_WORDS, predict_kind, strip_suffix, suffix_of
    from unionseg.progress import Rate, clock, make_progress, time_columns

    model, output = Path(model), Path(output)
    given = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(item) for item in inputs]
    quiet, sw_batch = not progress, sw_batch_size
    if not given:  # the command needs one; from Python an empty glob predicted nothing, in silence
        raise UnionsegError("no input given: name image files, folders of them or DICOM series folders")

    if not is_device_name(device):
        raise UnionsegError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    # the flags are named here: checked later, with the model file's settings, they read as its fault
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise UnionsegError(f"--overlap must be in [0, 1), got {overlap}")
    if sw_batch is not None and sw_batch < 1:
        raise UnionsegError(f"--sw-batch must be at least 1, got {sw_batch}")
    if overwrite and skip_existing:
        raise UnionsegError("--overwrite and --skip-existing exclude each other")
    if not output.exists() and suffix_of(output) in IMAGE_SUFFIXES:  # it would become a folder of that name
        raise UnionsegError(f"-o takes a folder, where each input's label map is written under its case name; "
                            f"{output.name} looks like a file name: give a folder "
                            f"(-o {shlex.quote(str(output.parent / strip_suffix(output)))}, "
                            "say)", output)
    cases = collect_inputs(given)
    for _, path in cases:  # predict's own outputs given back as inputs (-o of a run as the next run's input)
        kind = predict_kind(path) if path.is_file() else None
        if kind is not None:
            raise UnionsegError(f"a {KIND_WORDS[kind]} that unionseg predict wrote, not a CT image; predict "
                                "reads the scans themselves", path)
    done: set[str] = set()
    partial: list[str] = []
    if skip_existing and output.is_dir():
        for name, _ in cases:
            files = [output / f for f in output_files(name, probabilities)]
            present = [f for f in files if f.exists()]
            complete = len(present) == len(files)
            # a file predict did not write (ground truth of the same name) is never replaced, nor a
            # label map edited since (its voxels checked against its mark when it would be replaced)
            # each file must be predict's output of its own kind: x_probs.nii.gz, where x's probability map
            # goes, may be the label map of an input named x_probs, which x must never take or replace
            if not present or not all(written_by_predict(f, check_voxels=not complete and f == files[0],
                                                         kind=kind)
                                      for f, kind in zip(files, OUTPUT_KINDS, strict=False) if f in present):
                continue
            # the label map is written first, the probabilities after it: a case cut between the two (or
            # predicted before without --probabilities) is predicted again, its label map replaced
            if complete:
                done.add(name)
            else:
                partial.append(name)
        check_same_model(output, model, [*sorted(done), *partial], probabilities)
    # every case is checked, skipped ones included: -o naming the input folder, or two cases whose
    # outputs collide, must not pass for "already done"
    check_output_dir(output, cases, probabilities, overwrite, redo=[*done, *partial],
                     skip_existing=skip_existing)
    if done:
        typer.echo(f"skipping {len(done)} case(s) already in {output}", err=True)
        cases = [(name, path) for name, path in cases if name not in done]
        if not cases:
            typer.echo("nothing left to predict", err=True)
            return []
    if partial:
        typer.echo(f"predicting again {len(partial)} case(s) with incomplete outputs in {output}: "
                   + listing(partial, 5), err=True)
    check_writable(output)
    # torch and the network only after the cheap input checks: a bad input is refused at once
    from unionseg.inference.predictor import Predictor, resolve_device

    predictor = Predictor.from_checkpoint(model, device=resolve_device(device), overlap=overlap,
                                          sw_batch_size=sw_batch)
    console = Console(stderr=True, quiet=quiet)
    # -o is made by the first file written (write_image): an input that fails left an empty folder
    if not probabilities:
        stale = stale_probabilities(output, [name for name, _ in cases])
        if stale:
            typer.echo(f"warning: {output} holds probability maps of an earlier predict for cases this run "
                       f"writes label maps of ({listing(stale, 4)}); they are left as they are, and may not "
                       "match the new label maps: pass --probabilities to write them again, or remove them",
                       err=True)
    removed = remove_stale_temporaries(output, [name for name, _ in cases], probabilities)
    if removed:
        typer.echo(f"removed {removed} temporary file(s) left in {output} by an earlier predict that was killed",
                   err=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *time_columns())
    failed: list[tuple[str, DataError]] = []  # --keep-going: the inputs that could not be read
    written = 0
    paths: list[Path] = []  # the label maps written, in the order of the cases

    def finish(left: Sequence[str]) -> str:
        """How to go on with the cases ``left``: under --overwrite, --skip-existing would take their earlier
        outputs (another model's, as a rule) for finished ones, or refuse them."""
        if not overwrite:
            return "run the same command with --skip-existing to finish"
        return (f"predict the case(s) left ({listing(list(left), 5)}) again with --overwrite (or run the same "
                "command again, which writes every case anew); --skip-existing would take their earlier "
                "outputs for finished ones")

    def say_failed() -> None:
        """One line per unreadable input (--keep-going), above the stop's or the end's error, whether or
        not --quiet hid the case lines."""
        for _, problem in failed:
            typer.echo(f"failed: {problem}", err=True)

    with make_progress(*columns, console=console, transient=True) as bar:
        rate = Rate()  # the batch's, the first case's warm-up left out once a second is written
        for k, (name, path) in enumerate(cases, 1):
            task = bar.add_task(f"{name} (windows)", total=None)

            def update(done: int, total: int, task: TaskID = task, name: str = name) -> None:
                # after the last window the case is still restored onto its grid and written (with
                # --probabilities, most of its time): the bar says so instead of reading finished
                what = f"{name} (windows)" if done < total else f"{name} (restoring and writing)"
                bar.update(task, completed=done, total=total, description=what)

            start = time.perf_counter()
            names = output_files(name, probabilities)
            out_path = output / names[0]
            probs_path = output / names[1] if probabilities else None
            rest = f"case {name!r} and the {len(cases) - k} after it were not predicted" if k < len(cases) \
                else f"case {name!r} was not predicted"
            # check_output_dir decided above which existing files may be replaced; any other file is
            # never written over, even one that appears while this runs (another predict, same -o)
            try:
                predictor.predict_file(path, out_path, tta=tta, probs_path=probs_path, progress=update,
                                       overwrite=overwrite or name in partial)
            except OutputExistsError as exc:
                raise UnionsegError(f"appeared in the output folder while this predict ran (another predict "
                                    f"writing to {output}?) and was left as it is; {rest}: give each predict "
                                    "its own -o, or run again with --skip-existing", exc.path) from None
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what is done, and how to go on (cli says which)
                say_failed()
                left = [n for n, _ in failed] + [n for n, _ in cases[k - 1:]]
                typer.echo(f"stopped during case {name!r}: {written} of {len(cases)} case(s) written, each "
                           f"whole{f', {len(failed)} could not be predicted' if failed else ''}; {name!r} is to be "
                           f"predicted again; {finish(left)}", err=True)
                raise
            except DataError as exc:
                if keep_going:  # said now, in the case's line, and again at the end
                    bar.remove_task(task)
                    failed.append((name, exc))
                    console.print(f"[{k}/{len(cases)}] {name}: FAILED, left out: {exc}", markup=False,
                                  highlight=False, soft_wrap=True)
                    continue
                if len(cases) == 1:
                    raise
                left = [n for n, _ in cases[k - 1:]]
                raise DataError(f"{exc.message}; {rest} ({written} written): fix or remove it, then "
                                f"{finish(left)} (--keep-going goes past such inputs)", exc.path) from None
            bar.remove_task(task)
            written += 1
            paths.append(out_path)
            if written == 1:  # with the first label map: class names and colours for ITK-SNAP and 3D Slicer
                from unionseg.inference.viewers import write_label_tables

                write_label_tables(output, predictor.space)
            now = time.perf_counter()
            rate.moved(k)
            seconds = rate.eta(k, len(cases))
            eta = f", ETA {clock(seconds)}" if seconds is not None else ""
            also = f" and {names[1]}" if probabilities else ""
            # one line per case, however long (off a terminal rich wrapped it at 80 columns, breaking logs)
            console.print(f"[{k}/{len(cases)}] {name}: wrote {out_path}{also} ({now - start:.1f} s{eta})",
                          markup=False, highlight=False, soft_wrap=True)
    if failed:
        say_failed()
        kept = " (their earlier outputs in -o, if any, are left as they were)" if overwrite else ""
        error = UnionsegError(f"{len(failed)} of {len(cases)} input(s) could not be predicted (unreadable, or "
                              f"refused) and were left out "
                              f"({listing([n for n, _ in failed], 5)}){kept}; the other {written} were written: "
                              f"fix or remove those, then {finish([n for n, _ in failed])}", output)
        error.written = paths  # type: ignore[attr-defined]  # for a Python caller: what was done
        raise error
    return paths



def register(app: typer.Typer) -> None:
    """Add ``unionseg predict``."""

    @app.command("predict")
    def predict_command(
        model: Annotated[Path, typer.Argument(help="Model file written by `unionseg train`.")],
        inputs: Annotated[list[Path], typer.Argument(help="Images (NIfTI, NRRD, MHA), folders of images, "
                                                          "or DICOM series folders.")],
        output: Annotated[Path, typer.Option("--out", "-o", "--output", help="Output folder (<case>.nii.gz, uint8; and the label tables for ITK-SNAP and 3D Slicer).")],
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "auto",
        tta: Annotated[bool, typer.Option("--tta", help="Mirror test-time augmentation (8x slower).", metavar="")] = False,
        probabilities: Annotated[bool, typer.Option("--probabilities",
                                                    help="Also write <case>_probs.nii.gz (4D float32) and "
                                                    "<case>_probs.json, which says what each channel holds "
                                                    "(softmax methods: one per class, summing to 1; dodnet, "
                                                    "multihead, conditional, individual: one probability per "
                                                    "organ region, then per tumour; docs/prediction.md).",
                                                    metavar="")] = False,
        overlap: Annotated[Optional[float], typer.Option("--overlap", help="Window overlap in [0, 1) (default: the model file's).")] = None,
        sw_batch: Annotated[Optional[int], typer.Option("--sw-batch", help="Windows per network call (default: the model file's).")] = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace files of the same names already "
                                                                    "in the output folder.", metavar="")] = False,
        skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Leave out the cases whose outputs are "
                                                    "already in the output folder (e.g. after an interruption: "
                                                    "outputs are written whole or not at all).", metavar="")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar and no line per case (notes on skipped "
                                                            "or redone cases, warnings and errors still show).",
                                            metavar="")] = False,
        keep_going: Annotated[bool, typer.Option("--keep-going", help="An input that cannot be read (a corrupt or "
                                                 "truncated file, not 3D, NaN values) is reported and the batch "
                                                 "goes on; the command fails at the end, naming each such input.",
                                                 metavar="")] = False,
    ) -> None:
        """Segment CT images: one uint8 label map per input, with the input's exact geometry."""
        predict_folder(model, inputs, output, device=device, tta=tta, probabilities=probabilities, overlap=overlap,
                       sw_batch_size=sw_batch, overwrite=overwrite, skip_existing=skip_existing,
                       keep_going=keep_going, progress=not quiet)
