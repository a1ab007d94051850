"""The CI recipes of docs/ci.md run as written: every command of the GitHub Actions job and of the GitLab CI job, in
a folder holding a golden folder recorded from a model of our own, with DRIVER=reference. The install line is not
run (it would reinstall this environment); its constraints file is checked instead. PYTEST_ADDOPTS keeps the
suite's run to its forward tests: the command is the recipe's, the environment makes it short."""

import os
import re
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import yaml
from typer.testing import CliRunner

from conformance.cli import app
from tests import own_model
from tests.conftest import ROOT


def _recipe(name: str) -> dict:
    text = (ROOT / "docs" / "ci.md").read_text()
    return yaml.safe_load(re.search(rf"<!-- ci-recipe: {name} -->\n```yaml\n(.*?)```", text, re.S).group(1))


def _commands(name: str) -> tuple[dict, list[str]]:
    recipe = _recipe(name)
    if name == "github":
        job = recipe["jobs"]["gate"]
        return job.get("env", {}), [step["run"] for step in job["steps"] if "run" in step]
    job = recipe["lora-gate"]
    return job.get("variables", {}), job["script"]


@pytest.mark.parametrize("name", ["github", "gitlab"])
def test_the_ci_recipe_runs_as_written(name, tmp_path):
    variables, commands = _commands(name)
    adapters = own_model.write_adapters(tmp_path / "adapters")
    recorded = CliRunner().invoke(app, ["record", str(tmp_path / "goldens"), "--base", "tests.own_model:build",
                                        *[arg for path in adapters for arg in ("--adapter", str(path))]])
    assert recorded.exit_code == 0, recorded.output
    env = {**os.environ, **{k: str(v) for k, v in variables.items()}, "DRIVER": "reference",
           "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTEST_ADDOPTS": "-k test_fwd -p no:cacheprovider"}
    ran = 0
    for command in commands:
        if "pip install" in command:
            assert "-c constraints.txt" in command and (ROOT / "constraints.txt").is_file()
            continue
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        ran += 1
    assert ran == len(commands) - 1
    junit = ElementTree.parse(tmp_path / "reports" / "suite.xml").getroot()
    suite = junit if junit.tag == "testsuite" else junit.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    assert "LORA-GOLD-003" in (tmp_path / "reports" / "goldens.md").read_text()
    assert "LORA-FWD-001" in (tmp_path / "reports" / "suite.md").read_text()
    if name == "github":
        assert "peft-conformance" in (tmp_path / "summary.md").read_text()
    else:
        assert _recipe(name)["lora-gate"]["artifacts"]["reports"]["junit"] == "reports/suite.xml"
