"""The `peft-conformance` command."""

import shutil
import sys

import typer

from . import spec as spec_module

app = typer.Typer(help="Check LoRA implementations against Hugging Face peft.", no_args_is_help=True,
                  add_completion=False)


def _print_version(asked: bool) -> None:
    if asked:
        from . import SPEC_VERSION, __version__

        typer.echo(f"peft-conformance {__version__} (spec version {SPEC_VERSION})")
        raise typer.Exit()


@app.callback()
def _commands(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                           help="print the version and exit")) -> None:
    """Subcommands: spec, run, check-adapter, fixtures, corpus, golden-check, record, verify, compare."""


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


corpus_app = typer.Typer(help="The consumer corpus: golden cases for code that only loads adapters.",
                         no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("export")
def corpus_export(directory: str = typer.Argument(..., help="a new (or empty) folder to write the corpus into"),
                  folder: str = typer.Option(None, help="fixtures folder (default: the installed one)")) -> None:
    """Write the consumer corpus (bases, adapters, inputs, expected logits, manifest and its schema) to DIRECTORY."""
    from pathlib import Path

    from .consumer_kit import corpus

    try:
        written = corpus.export(Path(directory), Path(folder) if folder else None)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {len(corpus.read(written))} cases to {written}; compute each case's logits into "
               f"RESULTS/<case>/logits.safetensors, then: peft-conformance golden-check RESULTS --corpus {written}")


@corpus_app.command("generate")
def corpus_generate(folder: str = typer.Option(None, help="fixtures folder (default: this checkout's)")) -> None:
    """Record a NEW corpus version with the installed peft; never edits an old one."""
    from pathlib import Path

    from .consumer_kit import corpus

    try:
        typer.echo(f"wrote corpus {corpus.generate(Path(folder) if folder else None)}")
    except (FileExistsError, RuntimeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@corpus_app.command("run")
def corpus_run(consumer: str = typer.Argument(..., help="reference, transformers, llama.cpp or diffusers"),
               corpus_dir: str = typer.Argument(..., help="the folder `corpus export` wrote"),
               results: str = typer.Argument(..., help="where to write <case>/logits.safetensors"),
               case: list[str] = typer.Option(None, help="only these cases (repeatable)")) -> None:
    """Compute every corpus case with a shipped consumer; then check with golden-check --corpus."""
    from pathlib import Path

    from .consumer_kit import consumers

    try:
        done = consumers.run(consumer, Path(corpus_dir), Path(results), tuple(case or ()))
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for name, state in done.items():
        typer.echo(f"{state:5} {name}")
    typer.echo(f"wrote {results}; now: peft-conformance golden-check {results} --corpus {corpus_dir}")


@app.command()
def record(directory: str = typer.Argument(..., help="a new (or empty) folder for the golden cases"),
           base: str = typer.Option(..., help="a zoo model, module:factory, or a model directory (weights are "
                                             "referenced by path and sha256; config.json alone: built with --seed)"),
           adapter: list[str] = typer.Option(..., help="an adapter directory (repeatable)"),
           inputs: str = typer.Option(None, help="a safetensors file: the forward's keyword arguments (default: "
                                                 "2 x 8 token ids drawn with --seed)"),
           seed: int = typer.Option(0, help="seed of the drawn token ids and of a base built from config.json")
           ) -> None:
    """Record what your adapters compute today (with the installed peft), to verify after every upgrade."""
    from pathlib import Path

    from .adapter_kit import gate

    try:
        manifest = gate.record(Path(directory), base, [Path(a) for a in adapter], Path(inputs) if inputs else None,
                               seed)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    producer = manifest["producer"]
    typer.echo(f"recorded {len(manifest['cases'])} case(s) in {directory} with peft {producer['peft']}, torch "
               f"{producer['torch']}, transformers {producer['transformers']}; check with: "
               f"peft-conformance verify {directory}")


@app.command()
def verify(directory: str = typer.Argument(..., help="a folder `peft-conformance record` wrote"),
           impl: str = typer.Option("peft", help="the implementation that reloads the adapters: a driver name or "
                                                 "module:attr"),
           report_path: str = typer.Option(None, "--report", help="write the JSON report here (and .md beside)"),
           base: str = typer.Option(None, help="where the recorded base model directory is now (its weights must "
                                               "still match the recorded sha256)")
           ) -> None:
    """Reload every recorded adapter, recompute, re-save: exit 1 if anything moved beyond its tolerance."""
    from pathlib import Path

    from .adapter_kit import gate
    from .engine import report, terminal

    try:
        found = gate.verify(Path(directory), impl, base)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for line in found.moved:
        typer.echo(f"moved: {line}")
    _echo_case_failures(found.results)
    title = f"{found.implementation['name']} {found.implementation['version']} on {directory}"
    typer.echo(terminal.render(found.results, title, width=shutil.get_terminal_size().columns))
    if report_path:
        import transformers

        report.write(report.to_json(found.results, found.implementation,
                                    {"transformers": transformers.__version__}), report_path)
        typer.echo(f"wrote {report_path}")
    raise typer.Exit(1 if found.results.summary()["fail"] else 0)


@app.command()
def compare(reports: list[str] = typer.Argument(..., help="JSON reports, or folders of them"),
            output: str = typer.Option(None, help="write the Markdown table here instead of printing it"),
            by_case: bool = typer.Option(False, help="golden-check --corpus reports: one row per corpus case, and "
                                                     "a requirements table below")) -> None:
    """One table from several JSON reports: requirements as rows, implementations as columns."""
    from pathlib import Path

    from .engine.report import cases_markdown, compare_markdown

    paths = [p for r in reports for p in (sorted(Path(r).glob("*.json")) if Path(r).is_dir() else [Path(r)])]
    table = compare_markdown(paths)
    if by_case:
        table = cases_markdown(paths) + "\nBy requirement:\n\n" + table
    if output:
        Path(output).write_text(table)
        typer.echo(f"wrote {output} from {len(paths)} reports")
    else:
        sys.stdout.write(table)


@app.command("check-adapter")
def check_adapter(directory: str = typer.Argument(..., help="the adapter directory (or a diffusion LoRA file, kohya "
                                                           "or diffusers layout, with a diffusion --base)"),
                  base: str = typer.Option(None, help="the base model: a model directory (config.json; weights "
                                                       "optional), module:factory or a zoo model name; for a "
                                                       "diffusion LoRA file a pipeline directory (unet/, "
                                                       "text_encoder/) or sd-tiny; without it, the built-in tiny "
                                                       "GPT-2 (gpt2-tiny), and a note says so"),
                  as_json: bool = typer.Option(False, "--json", help="print the findings as JSON"),
                  allow_pickle: bool = typer.Option(False, help="read adapter_model.bin (runs code from the file)")
                  ) -> None:
    """Validate an adapter directory written by any tool (or a diffusion LoRA file); exit 1 on any error."""
    import json as json_module

    from .adapter_kit.check_adapter import check

    note = ""
    if base is None:
        base = "gpt2-tiny"
        note = ("no --base given: checked against the built-in tiny GPT-2 (gpt2-tiny); give the model the adapter is "
                "for with --base MODEL_DIR")
    try:
        report = check(directory, base, allow_pickle)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json_module.dumps({**report.to_json(), **({"note": note} if note else {})}, indent=2))
    else:
        if note:
            typer.echo(f"NOTE    {note}")
        for finding in report:
            typer.echo(f"{finding.level.upper():7} {finding.code}: {finding.message}")
        errors = sum(f.level == "error" for f in report)
        typer.echo(f"{directory}: {'OK' if report.ok else f'{errors} error(s)'}")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def run(impl: str = typer.Option(..., help="a registered driver name or module:attr"),
        device: str = typer.Option(None, help="comma-separated: cpu, cuda (default: cpu, plus cuda if seen)"),
        dtype: str = typer.Option(None, help="comma-separated base dtypes (default float32,bfloat16,float16)"),
        profile: str = typer.Option(None, help="hypothesis profile: dev, ci, thorough, quick"),
        expectations: str = typer.Option(None, help="your expectations file (known failures)"),
        report: str = typer.Option("peft-conformance-report.json", help="JSON report (and .md beside it)"),
        workers: int = typer.Option(0, help="pytest-xdist workers (0: run in this process)"),
        select: str = typer.Option(None, "-k", help="pytest -k expression")) -> None:
    """Run the conformance suite against an implementation and write the reports."""
    import pytest

    # this process imported the suite already, so pytest cannot rewrite its asserts (it uses none: no warning)
    args = ["--pyargs", "conformance.suite", "-p", "no:cacheprovider", f"--peft-impl={impl}",
            f"--peft-report={report}", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    for flag, value in (("--peft-device", device), ("--peft-dtype", dtype), ("--peft-profile", profile),
                        ("--peft-expectations", expectations), ("-k", select)):
        if value:
            args.append(f"{flag}={value}")
    if workers:
        args += ["-n", str(workers)]
    raise typer.Exit(int(pytest.main(args)))


def _echo_case_failures(results) -> None:
    """One line per failed (case, output): its requirement, the case and the first line of the numbers."""
    for outcome in results.outcomes:
        for failure in outcome.failures:
            if failure["req"] == outcome.reqs[0]:
                state = "XFAIL" if failure.get("expected") else "FAIL"
                first = failure["message"].splitlines()[0].removeprefix(f"{failure['req']} failed: ")
                typer.echo(f"{state} {failure['req']} {outcome.nodeid.rsplit('::', 1)[0]}: {first}")
        for req, message in outcome.unexpected.items():
            typer.echo(f"FAIL {req} {outcome.nodeid}: {message}")


@app.command("golden-check")
def golden_check(results: str = typer.Argument(..., help="RESULTS: <case>/logits.safetensors per corpus case "
                                                          "(or <version>/<case>/ per fixture case)"),
                 corpus_dir: str = typer.Option(None, "--corpus", help="the folder `corpus export` wrote (default: "
                                                                       "check against the golden fixtures)"),
                 folder: str = typer.Option(None, help="fixtures folder (default: the installed one)"),
                 expectations: str = typer.Option(None, help="the consumer's expectations file (known departures)"),
                 report_path: str = typer.Option(None, "--report", help="write the JSON report here (and .md beside)")
                 ) -> None:
    """Check logits computed in another process against peft's, per requirement; exit 1 on any failure."""
    import json
    from pathlib import Path

    from .consumer_kit import consumer_check
    from .engine import expectations as expectations_module
    from .engine import report, terminal

    try:
        goldens = (consumer_check.corpus_goldens(Path(corpus_dir)) if corpus_dir
                   else consumer_check.fixture_goldens(Path(folder) if folder else None))
        known = expectations_module.load(expectations) if expectations else None
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    results_found = consumer_check.check(goldens, Path(results), known)
    _echo_case_failures(results_found)
    consumer = consumer_check.consumer_identity(Path(results))
    typer.echo(terminal.render(results_found, f"{consumer['name']} {consumer['version']}".strip(),
                               width=shutil.get_terminal_size().columns))
    unused = known.unused(results_found.outcomes) if known else []
    for entry in unused:
        typer.echo(f"FAIL expectations: {entry.describe()} matches no case that was checked: stale or misspelled")
    if report_path:
        import transformers

        against = f"corpus {json.loads((Path(corpus_dir) / 'corpus.json').read_text())['corpus_version']}" \
            if corpus_dir else "fixtures"
        report.write(report.to_json(results_found, consumer, {"transformers": transformers.__version__,
                                                              "golden": against}), report_path)
        typer.echo(f"wrote {report_path}")
    failed = results_found.summary()["fail"] or unused
    matching = sum(not o.failures and o.outcome == "passed" for o in results_found.outcomes)
    typer.echo(f"{matching} of {len(results_found.outcomes)} case outputs match")
    raise typer.Exit(1 if failed else 0)


if __name__ == "__main__":
    main()
