"""Predictor speed and memory against a bare MONAI ``sliding_window_inference`` call.

Both sides run the SAME network (a model file with random weights) with the same window, overlap, window
batch and Gaussian blending, each in its own fresh subprocess so that peak RSS (``resource.getrusage``)
belongs to one side only:

* ``ours``: ``Predictor.predict_file`` end to end: read the NIfTI, preprocess, slab-stitched sliding
  window, probabilities back onto the input grid, merge, write the uint8 label map.
* ``bare``: the already preprocessed tensor (loaded before the clock starts) through MONAI's
  ``sliding_window_inference`` followed by ``argmax`` (what a bare script does).

Reported: wall-clock seconds of each, their ratio (target <= 1.15), peak RSS of each (targets: ours
<= 4 GiB and <= 0.7 x bare). Defaults are small (about a minute on 2 CPU cores); ``--full`` is the
acceptance setting: 512 x 512 x 300 voxels at 0.8 x 0.8 x 1.5 mm, 8 leaves, roi 96^3.

    python benchmarks/bench_predict.py            # small
    python benchmarks/bench_predict.py --full     # acceptance figures (tens of minutes on 2 CPU cores)
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


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
    return {"seconds": seconds, "peak_rss_mib": _peak_rss_mib(), "labels_shape": list(labels.shape)}


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
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--child", choices=("ours", "bare"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_ours(args.workdir) if args.child == "ours" else child_bare(args.workdir)
        print(json.dumps(result))
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
        bare = _run_child("bare", work)
        print(f"bare MONAI: {bare['seconds']:.1f} s, peak RSS {bare['peak_rss_mib']:.0f} MiB", flush=True)
        ours = _run_child("ours", work)
        print(f"ours      : {ours['seconds']:.1f} s, peak RSS {ours['peak_rss_mib']:.0f} MiB  {ours['stats']}")
        ratio = ours["seconds"] / bare["seconds"]
        mem = ours["peak_rss_mib"] / bare["peak_rss_mib"]
        print(f"time ratio ours/bare {ratio:.3f} (target <= 1.15); peak RSS ratio {mem:.2f} (target <= 0.7), "
              f"ours {ours['peak_rss_mib'] / 1024:.2f} GiB (target <= 4)")
        if args.json:
            args.json.write_text(json.dumps({"shape": shape, "spacing": spacing, "roi": roi, "preset": args.preset,
                                             "prepared_shape": info["prepared_shape"], "bare": bare, "ours": ours,
                                             "time_ratio": ratio, "rss_ratio": mem}, indent=1))


if __name__ == "__main__":
    main()
