"""unionseg: one multi-organ CT segmenter trained from several partially labelled datasets.

The whole workflow from Python, the commands' counterparts::

    import unionseg

    if __name__ == "__main__":  # in a script: prepare and the phantom start worker processes, which import it
        unionseg.generate_phantom("data", size="tiny")             # unionseg phantom (or bring your own)
        project = unionseg.load_project("data/project.yaml")
        unionseg.prepare_project(project)                           # unionseg prepare
        cfg = unionseg.train_config("cotraining", overrides=["steps=1500"])
        unionseg.train("data/project.yaml", cfg, "runs/cotraining")  # unionseg train
        unionseg.predict_folder("runs/cotraining/model.pt", "scans", "preds")  # unionseg predict
        predictor = unionseg.Predictor.from_checkpoint("runs/cotraining/model.pt")  # one image, arrays
        predictor.predict_file("scan.nii.gz", "scan_seg.nii.gz")
        unionseg.evaluate_folder("preds", "labels", project, out_dir="eval")  # unionseg evaluate
        unionseg.run_benchmark("ci", "bench")                       # unionseg benchmark
        unionseg.model_summary("runs/cotraining/model.pt")          # unionseg info MODEL (a dict)
        unionseg.project_summary("data/project.yaml")               # unionseg info PROJECT (a dict)
        unionseg.image_summary("scan.nii.gz")                       # unionseg info IMAGE (grid, label values)
        unionseg.available_methods()                                # unionseg methods (their names)

Importing the package is cheap: torch, MONAI and the image libraries are imported by the modules that
need them, never here; each name above imports its module the first time it is used.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

from unionseg.errors import UnionsegError

if TYPE_CHECKING:
    from unionseg.benchmark import run_benchmark as run_benchmark
    from unionseg.config import load_project as load_project
    from unionseg.data.phantom import generate_phantom as generate_phantom
    from unionseg.data.preprocess import prepare_project as prepare_project
    from unionseg.evaluation.evaluate import evaluate_folder as evaluate_folder
    from unionseg.inference.cli import predict_folder as predict_folder
    from unionseg.inference.predictor import Predictor as Predictor
    from unionseg.methods.base import available_methods as available_methods
    from unionseg.reports import image_summary as image_summary
    from unionseg.reports import model_summary as model_summary
    from unionseg.reports import project_summary as project_summary
    from unionseg.training.recipes import train_config as train_config
    from unionseg.training.trainer import train as train

__version__ = "0.1.0"

#: the public functions and classes, each with the module that defines it (imported on first use)
_PUBLIC = {
    "generate_phantom": "unionseg.data.phantom",
    "load_project": "unionseg.config",
    "prepare_project": "unionseg.data.preprocess",
    "train_config": "unionseg.training.recipes",
    "train": "unionseg.training.trainer",
    "Predictor": "unionseg.inference.predictor",
    "predict_folder": "unionseg.inference.cli",
    "evaluate_folder": "unionseg.evaluation.evaluate",
    "run_benchmark": "unionseg.benchmark",
    "model_summary": "unionseg.reports",
    "image_summary": "unionseg.reports",
    "project_summary": "unionseg.reports",
    "available_methods": "unionseg.methods.base",
}

__all__ = ["UnionsegError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'unionseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    """The public names and the subpackages imported so far (not this file's own imports)."""
    loaded = {name for name, value in globals().items()
              if isinstance(value, ModuleType) and value.__name__.startswith("unionseg.")}
    return sorted({*__all__, *loaded})
