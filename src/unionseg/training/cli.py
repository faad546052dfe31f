"""``unionseg train``: run every stage of a method and write a model file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(context_settings={"allow_extra_args": False})
    def train(
        project: Annotated[Path, typer.Argument(help="Project file (YAML), prepared with `unionseg prepare`.")],
        overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. steps=500 optim.lr=0.01 (options.NAME=VALUE: the method's options; init_from=MODEL.pt: start from a model file's weights; docs/training.md)")] = None,
        method: Annotated[Optional[str], typer.Option("--method", "-m", help="Method name (see `unionseg methods`; "
                                                      "default: the -c file's method:, else naive; another "
                                                      "method than the -c file's is refused).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", "-c", help="Recipe YAML, on top of the method's recipe built into unionseg: keys it leaves out keep that recipe's values (default: the built-in recipe alone, not a file of the working folder).")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", "--output", help="Run folder.")] = Path("runs/run"),
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from its last checkpoint "
                                                  "(last.pt), with the same method, recipe and overrides (the device, "
                                                  "log_every, ckpt_every and data.num_workers may change); with no run in OUT, a "
                                                  "new one starts.", metavar="")] = False,
        root: Annotated[Optional[list[str]], typer.Option("--root", help="Dataset root override NAME=DIR (repeatable).", metavar="NAME=DIR")] = None,
        device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or auto (the override "
                                                      "device=...; default: the recipe's, auto).")] = None,
        quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.", metavar="")] = False,
    ) -> None:
        """Train one network with a method (--method) on a prepared project; OUT/model.pt is what `unionseg predict` reads.

        The run folder OUT gets the resolved configuration, checkpoints (last.pt), logs and the model file; a folder that holds a run is refused unless --resume goes on from its checkpoint (a run stopped before its first checkpoint is started anew).

        Example: `unionseg train data/project.yaml -m cotraining -o runs/cot steps=1500`.
        """  # noqa: E501 - one line per paragraph: the help keeps a docstring's line breaks
        from unionseg.cli import _parse_roots
        from unionseg.training.recipes import train_config
        from unionseg.training.trainer import train as run_train

        # the user's recipe on top of the method's: what it leaves out keeps the method's recipe value
        given = [*(overrides or []), *([f"device={device}"] if device is not None else [])]
        cfg = train_config(method, config, given, given_as="--method")
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
    def methods(
        name: Annotated[Optional[str], typer.Argument(help="A method: its options with their defaults, its stages "
                                                           "and its built-in recipe.", metavar="[METHOD]")] = None,
    ) -> None:
        """List the available methods, or describe one (its options, as train's options.NAME=VALUE)."""
        from unionseg.methods.base import available_methods, get_method, is_plugin

        if name is not None:
            _describe_method(name)
            return
        names = available_methods()
        width = max(len(n) for n in names)
        for name in names:
            cls = get_method(name)
            origin = f" [plugin: {cls.__module__}]" if is_plugin(cls) else ""
            typer.echo(f"{name:<{width}}  {cls.summary}{origin}".rstrip())


def _describe_method(name: str) -> None:
    """``unionseg methods NAME``: what a method is, the stages it runs before training, its built-in recipe and
    every option with its default (helper-122 found a plugin's options only through a misspelt one's error)."""
    import dataclasses

    from unionseg.config import to_dict
    from unionseg.methods.base import get_method, is_plugin
    from unionseg.training.config import load_train_config
    from unionseg.training.recipes import default_recipe

    cls = get_method(name)  # an unknown name: ConfigError, naming the methods there are
    typer.echo(f"{name}: {cls.summary}" + (f" [plugin: {cls.__module__}]" if is_plugin(cls) else ""))
    before = [stage for stage in cls.stages if stage != "train"]
    typer.echo("stages before training: " + (", ".join(before) if before else "none"))
    typer.echo(f"recipe: {default_recipe(name)}")
    fields = dataclasses.fields(cls.Options) if dataclasses.is_dataclass(cls.Options) else ()
    if not fields:
        typer.echo("options: none")
        return
    # as the trainer records them (plain values: a tuple default is the list a recipe or an override writes)
    defaults = to_dict(cls.Options())
    recipe = load_train_config(default_recipe(name), method=name).options  # what `train -m NAME` sets
    typer.echo("options (the defaults; `unionseg train ... options.NAME=VALUE` changes one):")
    for field in fields:
        default = defaults[field.name]
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
        differs = f"; the recipe sets {recipe[field.name]!r}" if recipe.get(field.name, default) != default else ""
        typer.echo(f"  {field.name} = {default!r}  ({kind}{differs})")
