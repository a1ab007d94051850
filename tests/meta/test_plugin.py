"""The pytest plugin: options, errors, expectations, reports, xdist."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conformance.plugin import CI_VARIABLES
from tests.conftest import ROOT, run_suite

FWD = ("--pyargs", "conformance.suite.test_fwd")


@pytest.mark.req("LORA-DEV-002")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_missing_device_is_an_error():
    result = run_suite(*FWD, "--peft-impl=reference", "--peft-device=cuda")
    assert result.returncode == 4  # pytest's usage error, not a run of skips
    assert "--peft-device cuda: torch" in result.stderr and "sees no CUDA device" in result.stderr


def test_unknown_implementation_lists_the_registered_ones():
    result = run_suite(*FWD, "--peft-impl=nonesuch")
    assert result.returncode == 4 and "unknown implementation 'nonesuch'" in result.stderr
    assert "reference" in result.stderr and "loralib" in result.stderr


def test_without_an_implementation_the_suite_says_how_to_choose():
    result = run_suite(*FWD)
    assert result.returncode == 4 and "--peft-impl" in result.stderr


def test_report_files(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite(*FWD, "--peft-impl=reference", f"--peft-report={report}", "-k", "formula")
    assert result.returncode == 0, result.stdout[-2000:]
    data = json.loads(report.read_text())
    assert data["schema"] == "peft-conformance/report/v1"
    assert data["implementation"]["name"] == "reference" and data["environment"]["devices"] == ["cpu"]
    assert data["requirements"]["LORA-FWD-001"]["status"] == "pass"
    assert "| LORA-FWD-001 | MUST | pass |" in (tmp_path / "report.md").read_text()
    assert "CUDA cases will NOT run" in result.stdout  # said plainly, not skipped silently


def test_expectations_are_strict(tmp_path):
    stale = tmp_path / "stale.toml"
    stale.write_text('[[expect]]\nreq = "LORA-FWD-001"\nstatus = "fail"\nreason = "believed broken"\n'
                     '[[expect]]\nreq = "LORA-FWD-001"\nstatus = "fail"\nreason = "misspelled"\n'
                     'where = { test = "test_linear_layer_formulas" }\n'
                     '[[expect]]\nreq = "LORA-MERGE-001"\nstatus = "fail"\nreason = "not run here"\n')
    result = run_suite(*FWD, "--peft-impl=reference", f"--peft-expectations={stale}", "-k", "linear_layer")
    assert result.returncode == 1
    assert "expected to fail" in result.stdout and "but passed" in result.stdout
    assert "test=test_linear_layer_formulas) in" in result.stdout and "matched no test" in result.stdout
    # a selection that runs no test of a requirement cannot judge its entry: a note, not a failure
    assert "expectation LORA-MERGE-001 (fail) in" in result.stdout and "not judged" in result.stdout
    assert "ERROR: expectation LORA-MERGE-001" not in result.stdout


def test_expected_failure_keeps_the_run_green(tmp_path):
    expected = tmp_path / "expected.toml"
    expected.write_text('[[expect]]\nreq = "LORA-FWD-001"\nstatus = "fail"\nreason = "scaling doubled"\n')
    result = run_suite(*FWD, "--peft-impl=tests.mutants:WrongScaling", f"--peft-expectations={expected}",
                       "-k", "linear_layer")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "expected fail" in result.stdout and "scaling doubled" in result.stdout


@pytest.mark.parametrize("content, message", [
    ('[[expect]]\nreq = "LORA-NOPE-001"\nstatus = "fail"\nreason = "x"\n', "not a requirement ID"),
    ('[[expect]]\nreq = "LORA-FWD-001"\nstatus = "fail"\n', "needs a reason"),
    ('[[expect]]\nreq = "LORA-FWD-001"\nstatus = "maybe"\nreason = "x"\n', "status 'maybe'"),
    ("[[expect]\n", "not valid TOML")])
def test_bad_expectations_file_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run_suite(*FWD, "--peft-impl=reference", f"--peft-expectations={path}")
    assert result.returncode == 4 and message in result.stderr, result.stderr[-1000:]


def test_widened_tolerance_is_reported_as_such(tmp_path):
    widened = tmp_path / "widened.toml"
    widened.write_text('[[expect]]\nreq = "LORA-FWD-001"\nstatus = "tolerance"\nrtol = 1.0\natol = 10.0\n'
                       'reason = "a lossy kernel"\n')
    report = tmp_path / "report.json"
    result = run_suite(*FWD, "--peft-impl=tests.mutants:WrongScaling", f"--peft-expectations={widened}",
                       f"--peft-report={report}", "-k", "linear_layer")
    assert result.returncode == 0, result.stdout[-2000:]
    entry = json.loads(report.read_text())["requirements"]["LORA-FWD-001"]
    assert entry["status"] == "pass" and entry["widened"] is True
    assert "pass (widened)" in result.stdout


def test_xdist_gives_the_same_report(tmp_path):
    serial, parallel = tmp_path / "serial.json", tmp_path / "parallel.json"
    args = ("--pyargs", "conformance.suite.test_keys", "conformance.suite.test_unload",
            "--peft-impl=tests.mutants:UnloadLeavesWrapper")
    run_suite(*args, f"--peft-report={serial}")
    run_suite(*args, f"--peft-report={parallel}", "-n", "2")
    statuses = [{r: v["status"] for r, v in json.loads(p.read_text())["requirements"].items()}
                for p in (serial, parallel)]
    assert statuses[0] == statuses[1] and statuses[0]["LORA-UNLOAD-001"] == "fail"


@pytest.mark.req("LORA-ERR-015")
@pytest.mark.parametrize("mutant, message", [("RaisesOnWrap", "RuntimeError: driver bug: wrap exploded"),
                                             ("WrapReturnsNone", "NoneType"),
                                             ("HangsOnWrap", "stopped after 2 s (--peft-timeout)"),
                                             ("FailsThenHangs", "RuntimeError: driver bug: the first wrap fails")])
def test_a_broken_implementation_fails_its_tests_and_the_run_reports(mutant, message, tmp_path):
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite.test_fwd::test_linear_layer_formula",
                       "conformance.suite.test_cfg", f"--peft-impl=tests.mutants:{mutant}", "--peft-timeout=2",
                       f"--peft-report={report}", timeout=300)
    assert result.returncode == 1 and message in result.stdout, result.stdout[-3000:]
    data = json.loads(report.read_text())
    assert data["requirements"]["LORA-FWD-001"]["status"] == "fail"
    assert message in data["requirements"]["LORA-FWD-001"]["failures"][0]["message"]  # the first error, not a hang
    assert "requirements:" in result.stdout  # the run reached its summary


def test_peft_impl_accepts_a_file_path(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite(*FWD, f"--peft-impl={ROOT / 'tests' / 'split_driver.py'}:SplitLoraDriver",
                       f"--peft-report={report}", "-k", "output_matches_peft")
    assert result.returncode == 0, result.stdout[-2000:]
    assert json.loads(report.read_text())["requirements"]["LORA-FWD-006"]["status"] == "pass"


@pytest.mark.parametrize("on_ci", [False, True])
def test_the_profiles_are_the_same_on_ci_and_off_it(on_ci):
    """On CI hypothesis loads its own derandomized profile at import; dev and thorough must still draw at random
    (a nightly that replays the same draws explores nothing) and carry their seed into the repro."""
    code = ("from conformance.plugin import PROFILES; "
            "print({name: (p.derandomize, p.max_examples, p.database) for name, p in PROFILES.items()})")
    env = {name: value for name, value in os.environ.items() if name not in CI_VARIABLES}
    env.update({"PYTHONPATH": str(ROOT), **({"CI": "true"} if on_ci else {})})
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    profiles = eval(printed)
    assert profiles["dev"] == (False, 8, None) and profiles["thorough"] == (False, 200, None)
    assert profiles["ci"][0] and profiles["gate"][0] and profiles["quick"][0]


def test_the_draws_depend_on_the_profile_and_the_seed_alone(tmp_path, monkeypatch):
    """Hypothesis also draws literals read from the source of every loaded local module: a user's driver module (or a
    module another test had imported in the same xdist worker) changed the cases the same profile drew."""
    (tmp_path / "users_module.py").write_text("SIZES = (3, 5, 6, 7, 17, 31, 4242, 65537)\nRATE = 0.25\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    args = ("--pyargs", "conformance.suite.test_keys", "--peft-impl=reference", "--peft-profile=ci", "-s",
            "--hypothesis-verbosity=verbose", "-k", "match_peft or shapes_and_dtypes or dora_magnitude")
    draws = []
    for extra in ((), ("-p", "users_module")):
        printed = run_suite(*args, *extra)
        assert printed.returncode == 0, printed.stdout[-3000:]
        draws.append([line for line in printed.stdout.splitlines() if line.startswith("Draw ")])
    assert len(draws[0]) >= 30 and draws[0] == draws[1]


def test_adapters_kept_in_half_precision_are_charged_to_init_006_not_to_every_load(tmp_path):
    """A driver that keeps its factors in a bf16 base's dtype rounds peft's float32 values as it loads them: that is
    LORA-INIT-006's departure, judged once; the values still read back as loaded, in the dtype the driver keeps."""
    report = tmp_path / "report.json"
    run_suite(*FWD, "--peft-impl=tests.mutants:AdaptersInBaseDtype", "--peft-dtype=bfloat16",
              f"--peft-report={report}", "-k", "test_output_matches_peft")
    statuses = {r: v["status"] for r, v in json.loads(report.read_text())["requirements"].items()}
    assert statuses.get("LORA-KEYS-007") != "fail" and statuses["LORA-FWD-006"] != "not run", statuses


def test_a_failure_is_short_and_its_repro_fails_the_same_way_in_a_fresh_shell(tmp_path):
    """Profile dev draws at random: the printed repro carries the seed and this interpreter's path, so pasted into a
    shell without this environment (no PYTHONPATH, no venv on PATH) it fails with the same numbers; and the whole
    failure fits in a screenful or two (hypothesis would print every recorded comparison otherwise)."""
    report = tmp_path / "report.json"
    first = run_suite(*FWD, "--peft-impl=tests.mutants:WrongScaling", "--peft-profile=dev", f"--peft-report={report}",
                      "-k", "linear_layer")
    assert first.returncode == 1 and len(first.stdout.splitlines()) < 200, first.stdout[-3000:]
    failure = json.loads(report.read_text())["requirements"]["LORA-FWD-001"]["failures"][0]
    assert "--hypothesis-seed=" in failure["repro"] and f"{sys.executable} -m pytest" in failure["repro"]
    assert "\nreproduce: " + failure["repro"] + "\n" in first.stdout  # one line, not wrapped mid-argument
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path))}
    pasted = subprocess.run(["bash", "-c", failure["repro"]], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert pasted.returncode == 1, pasted.stdout[-2000:] + pasted.stderr[-2000:]
    worst = next(line for line in failure["message"].splitlines() if "worst element" in line)
    assert "LORA-FWD-001 failed" in pasted.stdout and worst.strip() in pasted.stdout


def test_distinct_failures_are_charged_to_their_own_requirements(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite.test_ser::test_saved_files_hold_the_live_tensors",
                       "--peft-impl=tests.mutants:SavesBrokenFilesByModel", "--peft-profile=ci",
                       f"--peft-report={report}")
    assert result.returncode == 1
    requirements = json.loads(report.read_text())["requirements"]
    metadata, tensors = requirements["LORA-SER-001"]["failures"], requirements["LORA-SER-002"]["failures"]
    assert requirements["LORA-SER-001"]["status"] == requirements["LORA-SER-002"]["status"] == "fail"
    assert "safetensors metadata" in metadata[0]["message"] and "GPT2" not in metadata[0]["message"]
    assert "dtype torch.float16" in tensors[0]["message"]
    assert "gpt2" in metadata[0]["example"] and "gpt2" not in tensors[0]["example"]


def test_the_dtype_axis_runs_and_is_reported_per_axis(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite(*FWD, "--peft-impl=reference", "--peft-dtype=float32,bfloat16", f"--peft-report={report}",
                       "-k", "output_matches_peft or linear_layer_formula")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "test_output_matches_peft[cpu-bfloat16]" in result.stdout or "2 passed" not in result.stdout
    requirements = json.loads(report.read_text())["requirements"]
    assert requirements["LORA-FWD-006"]["axes"] == {"cpu/float32": "pass", "cpu/bfloat16": "pass"}
    assert requirements["LORA-FWD-001"]["axes"] == {"cpu/float32": "pass"}  # the spec checks it in float32 only


def test_an_expectation_scoped_to_some_draws(tmp_path):
    scoped = tmp_path / "scoped.toml"
    scoped.write_text('[[expect]]\nreq = "LORA-FWD-006"\nstatus = "fail"\nwhen = { use_rslora = true }\n'
                      'reason = "rsLoRA is not supported: scaling stays alpha / r"\n')
    report = tmp_path / "report.json"
    args = ("--pyargs", "conformance.suite.test_fwd::test_output_matches_peft",
            "--peft-impl=tests.mutants:RsloraIgnored", "--peft-profile=ci")
    result = run_suite(*args, f"--peft-expectations={scoped}", f"--peft-report={report}")
    assert result.returncode == 0, result.stdout[-3000:]
    entry = json.loads(report.read_text())["requirements"]["LORA-FWD-006"]
    assert entry["status"] == "expected fail" and entry["counts"]["expected fail"] == 1
    too_narrow = tmp_path / "narrow.toml"  # rsLoRA fails on every model: a failure outside `when` is a real one
    too_narrow.write_text('[[expect]]\nreq = "LORA-FWD-006"\nstatus = "fail"\n'
                          'when = { use_rslora = true, model = "mlp" }\nreason = "believed to fail on the MLP only"\n')
    report = tmp_path / "narrow.json"
    result = run_suite(*args, f"--peft-expectations={too_narrow}", f"--peft-report={report}")
    assert result.returncode == 1, result.stdout[-2000:]
    failures = json.loads(report.read_text())["requirements"]["LORA-FWD-006"]["failures"]
    assert failures and "mlp" not in failures[0]["example"]


def test_a_crash_in_the_draws_an_expectation_covers_is_that_expected_failure(tmp_path):
    """A driver that raises (not a failed assertion) on some draws: a `when` entry covering those draws makes the
    crash an expected failure, and the other draws still run; without the entry the crash fails the requirement."""
    covering = tmp_path / "covering.toml"
    covering.write_text('[[expect]]\nreq = "LORA-FWD-006"\nstatus = "fail"\nwhen = { use_rslora = true }\n'
                        'reason = "crashes on rsLoRA"\n')
    args = ("--pyargs", "conformance.suite.test_fwd::test_output_matches_peft",
            "--peft-impl=tests.mutants:CrashesOnRslora", "--peft-profile=ci")
    report = tmp_path / "report.json"
    result = run_suite(*args, f"--peft-expectations={covering}", f"--peft-report={report}")
    assert result.returncode == 0, result.stdout[-3000:]
    entry = json.loads(report.read_text())["requirements"]["LORA-FWD-006"]
    assert entry["status"] == "expected fail", entry
    result = run_suite(*args, f"--peft-report={report}")
    assert result.returncode == 1 and "driver bug: rsLoRA crashes" in result.stdout, result.stdout[-2000:]
    assert json.loads(report.read_text())["requirements"]["LORA-FWD-006"]["status"] == "fail"


def test_a_driver_with_unexpected_keys_fails_a_requirement_not_the_suite(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite.test_err", "--peft-impl=tests.mutants:UnexpectedSavedKeys",
                       f"--peft-report={report}")
    assert result.returncode == 1
    assert "StopIteration" not in result.stdout and "KeyError" not in result.stdout
    requirements = json.loads(report.read_text())["requirements"]
    assert requirements["LORA-KEYS-001"]["status"] == "fail"
    assert "holds no key ending in" in requirements["LORA-KEYS-001"]["failures"][0]["message"]
