"""The `peft-conformance` command."""

import sys

import typer

from . import spec as spec_module

app = typer.Typer(help="Check LoRA implementations against Hugging Face peft.", no_args_is_help=True,
                  add_completion=False)


@app.callback()
def _commands() -> None:
    """Subcommands: spec, run, check-adapter, fixtures, compare."""


@app.command()
def spec() -> None:
    """Print SPEC.md, rendered from the requirement registry."""
    sys.stdout.write(spec_module.render_markdown())


def main() -> None:
    app()
