"""The end-of-run table: one row per requirement, then the totals and the failures with their repro commands."""

import io

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import spec
from .report import Results, closest_text, status_of, worst_text

STYLES = {"pass": "green", "fail": "bold red", "blocked": "yellow", "expected fail": "magenta",
          "not applicable": "dim", "not run": "dim"}


TITLES_FROM = 110  # terminal columns from which the table shows each requirement's title


def render(results: Results, title: str, width: int = 120, color: bool = False) -> str:
    by_req = results.by_requirement()
    table = Table(title=title, title_justify="left", expand=False, show_lines=False)
    columns = [("requirement", {"no_wrap": True, "min_width": 16}), ("level", {"min_width": 6}),
               ("status", {"no_wrap": True, "min_width": 14}), ("tests", {"justify": "right"}),
               ("worst error / reason", {"max_width": 36})]
    with_titles = width >= TITLES_FROM
    if with_titles:
        columns.append(("title", {"no_wrap": True, "overflow": "ellipsis", "max_width": 70}))
    for column, options in columns:
        table.add_column(column, **options)
    for req, result in by_req.items():
        info = spec.requirements().get(req)
        counts = result.counts
        tests = f"{counts['passed']}/{sum(counts.values())}"
        detail = worst_text(result)
        if result.status in ("not applicable", "not run", "expected fail") and result.reasons:
            detail = "; ".join(sorted(result.reasons))
        status = result.status + (" (widened)" if result.widened and result.status == "pass" else "")
        by_axis = {axis: status_of(counts) for axis, counts in result.axes.items()}
        if len(set(by_axis.values())) > 1:  # say which axis differs: "fail (cpu/bfloat16)"
            status += " (" + ", ".join(a for a, s in by_axis.items() if s == result.status) + ")"
        row = [req, info.level if info else "", f"[{STYLES[result.status]}]{status}[/]", tests, escape(detail)]
        table.add_row(*row, *([escape(info.title) if info else ""] if with_titles else []))
    totals = results.summary()
    line = ", ".join(f"{n} {status}" for status, n in totals.items() if n)
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None)
    console.print(table)
    console.print(f"requirements: {line} (of {sum(totals.values())})")
    closest = results.closest_per_class()
    if closest:
        console.print("tolerance classes, closest comparison (1x is the bound):\n" + closest_text(closest),
                      markup=False, highlight=False, soft_wrap=True)
    for req, result in by_req.items():
        if result.status == "fail":
            for failure in result.failures[:2]:
                console.print(f"\n[bold red]{req}[/] {failure['test']}", highlight=False)
                console.print(failure["message"], markup=False, highlight=False, soft_wrap=True)
                if failure.get("repro"):  # one line, never wrapped: it is pasted into a shell
                    console.print(f"reproduce: {failure['repro']}", markup=False, highlight=False, soft_wrap=True)
    return buffer.getvalue()


def print_summary(terminalreporter, results: Results, driver) -> None:
    terminalreporter.section("peft-conformance: requirements")
    title = f"{driver.name} {driver.version}"
    width = terminalreporter._tw.fullwidth  # the terminal's (pytest reads $COLUMNS, else 80 off a terminal)
    terminalreporter.write(render(results, title, width, terminalreporter.hasmarkup))
