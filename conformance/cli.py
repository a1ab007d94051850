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


fixtures_app = typer.Typer(help="The golden fixtures: generate a new version, verify the lock.", no_args_is_help=True)
app.add_typer(fixtures_app, name="fixtures")


@fixtures_app.command("generate")
def fixtures_generate(version: str = typer.Option(None, help="version folder to write, e.g. v2 (default: next)"),
                      folder: str = typer.Option(None, help="fixtures folder (default: this checkout's)")) -> None:
    """Record a NEW fixture version with the installed peft; never edits an old one."""
    from pathlib import Path

    from . import golden

    try:
        written, changed = golden.generate(Path(folder) if folder else None, version)
    except (FileExistsError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote fixtures {written}; against the previous version:")
    for line in changed:
        typer.echo(f"  {line}")


@fixtures_app.command("verify")
def fixtures_verify(folder: str = typer.Option(None, help="fixtures folder (default: the installed one)")) -> None:
    """Check every fixture file against FIXTURES.lock."""
    from pathlib import Path

    from . import golden

    problems = golden.verify(Path(folder) if folder else None)
    for problem in problems:
        typer.echo(f"FAIL {problem}")
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(golden.read_lock(Path(folder) if folder else None))} files match {golden.LOCK_NAME}")


@app.command()
def compare(reports: list[str] = typer.Argument(..., help="JSON reports, or folders of them"),
            output: str = typer.Option(None, help="write the Markdown table here instead of printing it")) -> None:
    """One table from several JSON reports: requirements as rows, implementations as columns."""
    from pathlib import Path

    from .report import compare_markdown

    paths = [p for r in reports for p in (sorted(Path(r).glob("*.json")) if Path(r).is_dir() else [Path(r)])]
    table = compare_markdown(paths)
    if output:
        Path(output).write_text(table)
        typer.echo(f"wrote {output} from {len(paths)} reports")
    else:
        sys.stdout.write(table)
