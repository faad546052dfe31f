"""``unionseg train``: run every stage of a method and write a model file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def resolve_method(method: str | None, recipe: Path | None) -> str:
    """The method to train: ``--method``, else the recipe's own ``method:``, else ``naive``.

    Raises:
        ConfigError: ``--method`` and the recipe name different methods.
    """
    from unionseg.config import load_yaml
    from unionseg.errors import ConfigError

    written = None
    if recipe is not None:
        raw = load_yaml(recipe)
        written = raw.get("method") if isinstance(raw, dict) else None
        if written is not None and not isinstance(written, str):
            raise ConfigError(f"method: expected a method name, got {written!r}", recipe)
    if method is not None and written is not None and written != method:
        raise ConfigError(f"method: the recipe says {written!r}, --method says {method!r}; give one of them",
                          recipe)
    return method or written or "naive"


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": False})
    def train(
        project: Annotated[Path, typer.Argument(help="Project file (YAML), prepared with `unionseg prepare`.")],
        overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. steps=500 optim.lr=0.01 (options.NAME=VALUE: the method's options; init_from=MODEL.pt: start from a model file's weights; docs/training.md)")] = None,
        method: Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (see `unionseg methods`; "
                                                      "default: the recipe's, else naive).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML, on top of the method's recipe built into unionseg: keys it leaves out keep that recipe's values (default: the built-in recipe alone, not a file of the working folder).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.pt.", metavar="")] = False,
        root: Annotated[Optional[list[str]], typer.Option("--root", help="Dataset root override NAME=DIR (repeatable).", metavar="NAME=DIR")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.", metavar="")] = False,
    ) -> None:
        """Train METHOD on a prepared project: shared artefacts, stages, the loop, validation, model file."""
        from unionseg.cli import _parse_roots
        from unionseg.training.config import load_train_config
        from unionseg.training.recipes import default_recipe
        from unionseg.training.trainer import train as run_train

        method = resolve_method(method, config)
        if config is None:
            cfg = load_train_config(default_recipe(method), overrides or [], method=method)
        else:  # the user's recipe on top of the method's: what it leaves out keeps the method's recipe value
            cfg = load_train_config(config, overrides or [], base=default_recipe(method), method=method)
        summary = run_train(project, cfg, out, resume=resume, roots=_parse_roots(root), progress=not quiet)
        over = "organ regions" if summary.get("selected_on") == "regions" else "classes"
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 alone reports
            step = summary.get("selected_at_step")
            at = f" (step {step} of {summary['steps']})" if step else ""
            score = summary["best_val_mean_dice"]
            typer.echo(f"model: {summary['model']}{at}  "
                       + (f"best validation mean Dice over {over}: {score:.4f}" if score is not None
                          else "not validated (no validation case): the last step's weights"))

    @app.command()
    def methods() -> None:
        """List the available methods."""
        from unionseg.methods.base import available_methods, get_method

        names = available_methods()
        width = max(len(n) for n in names)
        for name in names:
            typer.echo(f"{name:<{width}}  {get_method(name).summary}".rstrip())
