"""Predictor speed and memory against a bare MONAI ``sliding_window_inference`` call.

Both sides run the SAME network (a model file with random weights) with the same window, overlap, window
batch and Gaussian blending, each in its own fresh subprocess so that peak RSS belongs to one side only: the
child's own high-water mark (``VmHWM`` of /proc/self/status; ``ru_maxrss`` where there is none, which a
child inherits from the parent's peak across fork and exec, as helper-125 showed):

* ``ours``: ``Predictor.predict_file`` end to end: read the NIfTI, preprocess, slab-stitched sliding
  window, probabilities back onto the input grid, merge, write the uint8 label map.
* ``bare``: the already preprocessed tensor (loaded before the clock starts) through MONAI's
  ``sliding_window_inference`` followed by ``argmax`` (what a bare script does).

Reported: wall-clock seconds of each, their ratio (target <= 1.15), peak RSS of each (targets: ours
<= 4 GiB and <= 0.7 x bare). ``--rounds N`` runs the pair N times, the order alternating (bare first in odd
rounds, ours first in even ones), and reports each round's ratios and their median: this machine's speed
moves by a fifth within minutes, so one pair cannot resolve a few per cent. Then (``--no-check`` skips it) a
check outside the timing: the argmax of our stitched logits on the prepared grid against the bare call's
labels, as the share of voxels that agree (ours may accumulate in float16 slabs, so not bit for bit).
Defaults are small (about a minute on 2 CPU cores; fixed costs dominate there, so the targets are read at
``--full``); ``--full`` is the acceptance setting: 512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm, 8 leaves,
roi 96^3.

    python benchmarks/bench_predict.py                      # small
    python benchmarks/bench_predict.py --full --rounds 3    # acceptance figures (about 12 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LEAVES = [("liver", None), ("liver_tumour", "liver"), ("kidney", None), ("kidney_tumour", "kidney"),
          ("pancreas", None), ("pancreas_tumour", "pancreas"), ("spleen", None)]


def _peak_rss_mib() -> float:
    """This process's peak resident memory since its exec (MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux (inherited, see above)


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """An abdomen-like int16 CT: air, an elliptic body with fat rim, organs, spine; built slice by slice."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    ct = np.empty(shape, dtype=np.int16)
    for k in range(shape[2]):
        t = k / max(shape[2] - 1, 1)
        sl = np.full(shape[:2], -1000.0)
        body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
        sl[body] = -90.0
        sl[(x / 0.78) ** 2 + (y / 0.58) ** 2 < 1] = 40.0
        sl[((x + 0.35) / 0.3) ** 2 + ((y + 0.1) / (0.25 + 0.1 * t)) ** 2 < 1] = 60.0  # liver
        sl[((x - 0.4) / 0.12) ** 2 + ((y - 0.2) / 0.1) ** 2 < 1] = 150.0  # kidney
        sl[(x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 < 1] = 700.0  # spine
        sl += rng.normal(0, 10, shape[:2])
        ct[..., k] = np.clip(sl, -1024, 3000).astype(np.int16)
    return ct


def setup(work: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float], roi: int, preset: str,
          sw_batch: int) -> None:
    """Write the CT, the model file and the preprocessed tensor the bare call gets."""
    import torch

    from unionseg.config import PreprocessSpec
    from unionseg.data.io import Geometry, read_image, write_image
    from unionseg.data.preprocess import preprocess_image
    from unionseg.labels import LabelSpace, Leaf
    from unionseg.modelfile import make_payload, save_model
    from unionseg.networks import build_network

    work.mkdir(parents=True, exist_ok=True)
    geom = Geometry(shape, np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))  # LPS-like, as DICOM-born CTs
    write_image(work / "ct.nii.gz", synthetic_ct(shape), geom, replace=True)
    space = LabelSpace([Leaf(n, p) for n, p in LEAVES])
    spec = PreprocessSpec(spacing=spacing)
    network = {"backbone": {"name": "resunet", "preset": preset}, "head": {"name": "softmax", "out_channels": space.n_leaves}}
    torch.manual_seed(0)
    net = build_network(network)
    payload = make_payload(method="naive", network=network, state_dict=net.state_dict(), output_form="softmax",
                           channels=space.names, label_space=space, preprocessing=spec,
                           inference={"roi_size": [roi] * 3, "overlap": 0.5, "sw_batch_size": sw_batch})
    save_model(work / "model.pt", payload)
    array, g = read_image(work / "ct.nii.gz")
    prepared, record = preprocess_image(array, g, spec)
    np.save(work / "prepared.npy", prepared)
    (work / "setup.json").write_text(json.dumps({"prepared_shape": list(prepared.shape),
                                                 "source_shape": list(shape)}))


def child_ours(work: Path) -> dict:
    from unionseg.inference import Predictor

    predictor = Predictor.from_checkpoint(work / "model.pt", device="cpu")
    start = time.perf_counter()
    predictor.predict_file(work / "ct.nii.gz", work / "out" / "ct.nii.gz", overwrite=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "stats": {k: str(v) for k, v in
                                                                          predictor.last_stats.items()}}


def child_bare(work: Path) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from unionseg.modelfile import build_from_payload, load_model
    from unionseg.networks import set_layout

    payload = load_model(work / "model.pt")
    net = set_layout(build_from_payload(payload), "cpu")  # the predictor's layout: compare the pipelines, not it
    inf = payload["inference"]
    x = torch.from_numpy(np.load(work / "prepared.npy"))[None, None]
    start = time.perf_counter()
    with torch.inference_mode():
        logits = sliding_window_inference(x, inf["roi_size"], inf["sw_batch_size"], net, overlap=inf["overlap"],
                                          mode="gaussian", cval=-1.0)
        labels = torch.argmax(logits, dim=1).to(torch.uint8)
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    np.save(work / "bare_labels.npy", labels[0].numpy())  # for the check, after the clock and the peak
    return {"seconds": seconds, "peak_rss_mib": peak, "labels_shape": list(labels.shape)}


def child_check(work: Path) -> dict:
    """Our stitched logits' argmax on the prepared grid against the bare call's labels (not timed)."""
    from unionseg.inference import Predictor

    predictor = Predictor.from_checkpoint(work / "model.pt", device="cpu")
    ours = predictor.sliding_window_logits(np.load(work / "prepared.npy")).argmax(0).numpy()
    bare = np.load(work / "bare_labels.npy")
    return {"agree": float((ours == bare).mean()), "voxels": int(bare.size)}


def _run_child(kind: str, work: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, "--workdir", str(work)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm, roi 96")
    parser.add_argument("--shape", type=int, nargs=3, default=None)
    parser.add_argument("--roi", type=int, default=None)
    parser.add_argument("--preset", default="tiny", help="ResUNet preset of the random network (tiny, cpu)")
    parser.add_argument("--sw-batch", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="pairs run, the order alternating; the median "
                                                                  "ratios are reported")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the agreement check of our stitched logits with the bare call's labels")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", choices=("ours", "bare", "check"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = {"ours": child_ours, "bare": child_bare, "check": child_check}[args.child]
        print(json.dumps(child(args.workdir)))
        return
    shape = tuple(args.shape or ((512, 512, 300) if args.full else (160, 160, 64)))
    roi = args.roi or (96 if args.full else 48)
    spacing = (0.8, 0.8, 1.5)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        setup(work, shape, spacing, roi, args.preset, args.sw_batch)  # type: ignore[arg-type]
        info = json.loads((work / "setup.json").read_text())
        print(f"setup {time.perf_counter() - t0:.1f} s: CT {shape} at {spacing} mm, prepared "
              f"{tuple(info['prepared_shape'])}, roi {roi}^3, {len(LEAVES) + 1} leaves, resunet/{args.preset}",
              flush=True)
        rounds = []
        for r in range(args.rounds):
            sides: dict[str, dict] = {}
            for kind in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
                sides[kind] = _run_child(kind, work)
                print(f"round {r + 1} {kind:4}: {sides[kind]['seconds']:.1f} s, peak RSS "
                      f"{sides[kind]['peak_rss_mib']:.0f} MiB", flush=True)
            rounds.append({**sides, "time_ratio": sides["ours"]["seconds"] / sides["bare"]["seconds"],
                           "rss_ratio": sides["ours"]["peak_rss_mib"] / sides["bare"]["peak_rss_mib"]})
        print(f"ours' stitching: {rounds[-1]['ours']['stats']}")
        ratio = float(np.median([r["time_ratio"] for r in rounds]))
        mem = float(np.median([r["rss_ratio"] for r in rounds]))
        ours_gib = float(np.median([r["ours"]["peak_rss_mib"] for r in rounds])) / 1024
        spread = ", ".join(f"{r['time_ratio']:.3f}" for r in rounds)
        print(f"time ratio ours/bare {ratio:.3f} (median of {len(rounds)}: {spread}; target <= 1.15 at --full); "
              f"peak RSS ratio {mem:.2f} (target <= 0.7), ours {ours_gib:.2f} GiB (target <= 4)")
        check = _run_child("check", work) if args.check else None
        if check is not None:
            print(f"check: our stitched logits' argmax agrees with the bare call's labels on "
                  f"{100 * check['agree']:.3f} % of {check['voxels']:,} prepared voxels")
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "spacing": spacing, "roi": roi, "preset": args.preset,
                                             "prepared_shape": info["prepared_shape"], "rounds": rounds,
                                             "time_ratio": ratio, "rss_ratio": mem, "check": check}, indent=1))


if __name__ == "__main__":
    main()
