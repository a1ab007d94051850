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


@app.command("check-adapter")
def check_adapter(directory: str = typer.Argument(..., help="the adapter directory"),
                  base: str = typer.Option("gpt2-tiny", help="a zoo model name or module:factory"),
                  as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
                  allow_pickle: bool = typer.Option(False, help="read adapter_model.bin (runs code from the file)")
                  ) -> None:
    """Validate an adapter directory written by any tool; exit 1 on any error."""
    import json as json_module

    from .check_adapter import check

    try:
        report = check(directory, base, allow_pickle)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json_module.dumps(report.to_json(), indent=2))
    else:
        for finding in report:
            typer.echo(f"{finding.level.upper():7} {finding.code}: {finding.message}")
        errors = sum(f.level == "error" for f in report)
        typer.echo(f"{directory}: {'OK' if report.ok else f'{errors} error(s)'}")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def run(impl: str = typer.Option(..., help="a registered driver name or module:attr"),
        device: str = typer.Option(None, help="comma-separated: cpu, cuda (default: cpu, plus cuda if seen)"),
        dtype: str = typer.Option(None, help="comma-separated base dtypes (default float32)"),
        profile: str = typer.Option(None, help="hypothesis profile: dev, ci, thorough, quick"),
        expectations: str = typer.Option(None, help="your expectations file (known failures)"),
        report: str = typer.Option("peft-conformance-report.json", help="JSON report (and .md beside it)"),
        workers: int = typer.Option(0, help="pytest-xdist workers (0: run in this process)"),
        select: str = typer.Option(None, "-k", help="pytest -k expression")) -> None:
    """Run the conformance suite against an implementation and write the reports."""
    import pytest

    args = ["--pyargs", "conformance.suite", "-p", "no:cacheprovider", f"--peft-impl={impl}",
            f"--peft-report={report}"]
    for flag, value in (("--peft-device", device), ("--peft-dtype", dtype), ("--peft-profile", profile),
                        ("--peft-expectations", expectations), ("-k", select)):
        if value:
            args.append(f"{flag}={value}")
    if workers:
        args += ["-n", str(workers)]
    raise typer.Exit(int(pytest.main(args)))


@app.command("golden-check")
def golden_check(results: str = typer.Argument(..., help="folder of <version>/<case>/logits.safetensors"),
                 folder: str = typer.Option(None, help="fixtures folder (default: the installed one)")) -> None:
    """Check golden results computed in another process (a library that cannot share this venv)."""
    from pathlib import Path

    from . import golden

    problems = golden.check_results(Path(results), Path(folder) if folder else None)
    for case, req, problem in problems:
        typer.echo(f"FAIL {req} {case}: {problem}")
    total = len(golden.cases(Path(folder) if folder else None))
    typer.echo(f"{total - len({p[0] for p in problems})} of {total} golden cases match")
    raise typer.Exit(1 if problems else 0)


if __name__ == "__main__":
    main()
