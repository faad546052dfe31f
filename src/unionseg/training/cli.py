"""``unionseg train``: run every stage of a method and write a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": False})
    def train(
        project: Annotated[Path, typer.Argument(help="Project file (YAML), prepared with `unionseg prepare`.")],
        overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. steps=500 options.w_s=0")] = None,
        method: Annotated[str, typer.Option("--method", "-m", help="Method name (see `unionseg methods`).")] = "naive",
        config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML (default: configs/<method>.yaml if present).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.")] = False,
        root: Annotated[Optional[list[str]], typer.Option("--root", help="Dataset root override NAME=DIR.")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    ) -> None:
        """Train METHOD on a prepared project: shared artefacts, stages, the loop, validation, model file."""
        from unionseg.cli import _parse_roots
        from unionseg.errors import UnionsegError
        from unionseg.training.config import load_train_config
        from unionseg.training.recipes import default_recipe
        from unionseg.training.trainer import train as run_train

        recipe = config if config is not None else default_recipe(method)
        cfg = load_train_config(recipe, overrides or [], method=method)
        if (out / "last.pt").exists() and not resume:
            raise UnionsegError("run folder already holds a checkpoint; pass --resume to continue it or choose "
                                "another --out (nothing was overwritten)", out)
        summary = run_train(project, cfg, out, resume=resume, roots=_parse_roots(root), progress=not quiet)
        over = "organ regions" if summary.get("selected_on") == "regions" else "classes"
        typer.echo(f"model: {summary['model']}  best validation mean Dice over {over}: "
                   f"{summary['best_val_mean_dice']:.4f}")

    @app.command()
    def methods() -> None:
        """List the available methods."""
        from unionseg.methods.base import available_methods

        for name in available_methods():
            typer.echo(name)
