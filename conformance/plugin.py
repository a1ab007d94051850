"""The pytest plugin (entry point `pytest11`): options, hypothesis profiles, the `run` fixture, the device and dtype
axes, applicability from the registry, a per-test timeout, and the per-requirement report.

It stays inert in test runs that collect no conformance test.
"""

import functools
import os
import random
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import HypothesisException

from . import api, spec
from .engine import checks, expectations, outcomes, report
from .engine.run import NOT_APPLICABLE, NOT_RUN, Run
from .engine.terminal import print_summary
from .engine.verdict import Verdict
from .zoo import quantized

ENV = "PEFT_CONFORMANCE_"
SUITE_DIR = str(Path(__file__).parent / "suite")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Every dtype by default: users train and serve in half precision, and some bugs show only there (a saved bias
# upcast to float32, the LoRA branch computed in the base dtype). `--peft-dtype float32` is the quick run.
DEFAULT_DTYPES = tuple(DTYPES)

# function_scoped_fixture: `run` is meant to span a test's examples (it gathers what they assert).
_quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture]
# Each profile built on hypothesis' defaults, not on the profile loaded at import: on CI hypothesis loads its own
# "ci" profile first, and a profile that left derandomize unset would inherit derandomize=True from it.
_defaults = settings.get_profile("default")
PROFILES = {
    # dev and thorough draw at random, from a seed the repro commands carry; no profile keeps a database, so that
    # nothing lands in the folder the suite runs from and no old failure replays where it cannot be reproduced
    "dev": settings(_defaults, max_examples=8, deadline=None, database=None, print_blob=True,
                    suppress_health_check=_quiet),
    "ci": settings(_defaults, max_examples=12, deadline=None, derandomize=True, database=None, print_blob=True,
                   suppress_health_check=_quiet),
    # nightly: random draws, so that each night explores new cases
    "thorough": settings(_defaults, max_examples=200, deadline=None, database=None, print_blob=True,
                         suppress_health_check=_quiet),
    # ci's draws without shrinking: the same verdicts, sooner when things fail (failing examples come unshrunk)
    "gate": settings(_defaults, max_examples=12, deadline=None, derandomize=True, database=None,
                     phases=[Phase.explicit, Phase.generate], suppress_health_check=_quiet),
    # a smoke run: few examples, failures reported as found (no shrinking)
    "quick": settings(_defaults, max_examples=4, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=_quiet),
}
for _name, _profile in PROFILES.items():
    settings.register_profile(f"peft-conformance-{_name}", _profile)


def _draw_from_the_seed_alone() -> None:
    """Hypothesis mixes literals it reads from the source of every loaded local module into its draws (integers and
    strings, 1 in 20 draws). Which modules are loaded depends on the user's driver, on the order xdist runs the tests
    in, and on whether the suite is installed or run from a checkout, so the same seed (or derandomized profile) drew
    different cases from one run to the next. With none of them, a profile and a seed fix the draws."""
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover - hypothesis before it read local modules
        return
    if hasattr(providers, "_get_local_constants"):
        providers._get_local_constants = providers.Constants
# The variables hypothesis itself reads to detect CI, tox's renamed CI included.
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "TF_BUILD", "JENKINS_URL",
                "__TOX_ENVIRONMENT_VARIABLE_ORIGINAL_CI")


@dataclass
class State:
    impl_spec: Optional[str]
    devices: list[str]
    dtypes: list[str]
    profile: str
    timeout: float
    report_path: Optional[str]
    expectations: Optional[expectations.Expectations]
    results: report.Results = field(default_factory=report.Results)
    active: bool = False
    _impl: Optional[api.Driver] = None
    _oracle: object = False

    def impl(self) -> api.Driver:
        if self._impl is None:
            if not self.impl_spec:
                raise pytest.UsageError("choose the implementation to test: --peft-impl NAME, module:attr or "
                                        f"path/to/file.py:attr (or {ENV}IMPL); registered: "
                                        f"{sorted(api.available_drivers())}")
            try:
                self._impl = api.load_driver(self.impl_spec)
            except ValueError as error:
                raise pytest.UsageError(str(error)) from None
        return self._impl

    def oracle(self) -> Optional[api.Driver]:
        if self._oracle is False:
            try:
                from .drivers.peft import PeftDriver
                self._oracle = PeftDriver()
            except ImportError:
                self._oracle = None
        return self._oracle


state_key = pytest.StashKey[State]()
verdict_key = pytest.StashKey[Verdict]()
excluded_key = pytest.StashKey[dict]()


def _option(config, name: str, default=None):
    value = config.getoption(name.replace("-", "_"))
    return value if value is not None else os.environ.get(ENV + name.upper().replace("-", "_"), default)


def pytest_addoption(parser):
    group = parser.getgroup("peft-conformance", "LoRA conformance suite")
    group.addoption("--peft-impl", help=f"the implementation under test: a registered driver name, module:attr or "
                                        f"path/to/file.py:attr [{ENV}IMPL]")
    group.addoption("--peft-device", help="comma-separated devices; default: cpu, plus cuda when torch sees one. "
                                          f"A device torch does not see is an error [{ENV}DEVICE]")
    group.addoption("--peft-dtype", help=f"comma-separated base-model dtypes: float32, bfloat16, float16 "
                                         f"(default all three); each requirement runs in the ones the spec covers "
                                         f"[{ENV}DTYPE]")
    group.addoption("--peft-expectations", help=f"TOML file of known failures, owned by the implementer "
                                                f"[{ENV}EXPECTATIONS]")
    group.addoption("--peft-report", help=f"write the JSON report here, and a Markdown summary next to it "
                                          f"[{ENV}REPORT]")
    group.addoption("--peft-profile", choices=sorted(PROFILES), help=f"hypothesis profile: dev (fast), ci "
                    f"(derandomized, no database), gate (ci without shrinking), thorough (nightly), quick (smoke, no "
                    f"shrinking); default ci on CI, else dev [{ENV}PROFILE]")
    group.addoption("--peft-timeout", type=float, help=f"seconds before a test is stopped and failed "
                                                       f"(default 300) [{ENV}TIMEOUT]")


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin reads --hypothesis-seed
def pytest_configure(config):
    config.addinivalue_line("markers", "req(*ids): the requirement IDs a conformance test checks")
    quantized.quiet()  # before peft imports bitsandbytes
    devices = _devices(_option(config, "peft-device"))
    dtypes = [d.strip() for d in (_option(config, "peft-dtype") or ",".join(DEFAULT_DTYPES)).split(",") if d.strip()]
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise pytest.UsageError(f"--peft-dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    in_ci = any(os.environ.get(v) for v in CI_VARIABLES)
    profile = _option(config, "peft-profile") or ("ci" if in_ci else "dev")
    if profile not in PROFILES:
        raise pytest.UsageError(f"{ENV}PROFILE {profile!r}: expected one of {sorted(PROFILES)}")
    exp_path = _option(config, "peft-expectations")
    config.stash[state_key] = State(
        impl_spec=_option(config, "peft-impl"), devices=devices, dtypes=dtypes, profile=profile,
        timeout=float(_option(config, "peft-timeout", 300)), report_path=_option(config, "peft-report"),
        expectations=_load_expectations(exp_path) if exp_path else None)
    config.pluginmanager.register(_Collector(config.stash[state_key]), "peft-conformance-collector")
    if config.stash[state_key].impl_spec:
        # Before collection: @given reads the default settings when the test module is imported.
        settings.load_profile(f"peft-conformance-{profile}")
        _draw_from_the_seed_alone()
        if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):  # hypothesis' caches, out of the user's folder
            set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "peft-conformance-hypothesis")
        if not PROFILES[profile].derandomize and config.getoption("hypothesis_seed", None) is None:
            # Random draws, from a seed the repro commands carry (xdist hands the option to its workers).
            config.option.hypothesis_seed = str(random.randrange(2**32))


def _load_expectations(path: str) -> expectations.Expectations:
    try:
        return expectations.load(path)
    except (OSError, ValueError) as error:
        raise pytest.UsageError(str(error)) from None


def _devices(option: Optional[str]) -> list[str]:
    """The devices to run on. Asking for one that torch does not see is an error (LORA-DEV-002)."""
    if not option:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = [d.strip() for d in option.split(",") if d.strip()]
    for device in devices:
        kind = device.split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError(f"--peft-device {device}: torch {torch.__version__} sees no CUDA device "
                                    f"(built for CUDA {torch.version.cuda}); drop it or run on a GPU machine")
        if kind not in ("cpu", "cuda"):
            raise pytest.UsageError(f"--peft-device {device!r}: expected cpu or cuda[:N]")
    return devices


def _is_suite_item(item) -> bool:
    """A conformance test: in conformance/suite, or anywhere when it works through the `run` fixture."""
    return str(item.path).startswith(SUITE_DIR) or "run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    state = config.stash[state_key]
    suite_items = [item for item in items if _is_suite_item(item)]
    if not suite_items:
        return
    state.active = True
    state.impl()  # fail early, before any test, on an unknown or broken driver
    if torch.cuda.is_available():  # TF32 would make CUDA results differ from CPU by ~1e-3
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    known = spec.requirements()
    for item in suite_items:
        ids = outcomes.claimed(item)
        if not ids:
            raise pytest.UsageError(f"{item.nodeid}: a conformance test needs @pytest.mark.req(...)")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise pytest.UsageError(f"{item.nodeid}: unknown requirement IDs {unknown}")
        chatter = ("UserWarning", "FutureWarning", "DeprecationWarning", "RuntimeWarning")  # the implementations'
        for category in chatter:
            item.add_marker(pytest.mark.filterwarnings(f"ignore::{category}"))


def pytest_generate_tests(metafunc):
    if not (str(metafunc.definition.path).startswith(SUITE_DIR) or "run" in metafunc.fixturenames):
        return
    state = metafunc.config.stash[state_key]
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", state.devices)
    if "dtype" in metafunc.fixturenames:
        covered = {d for req in outcomes.claimed(metafunc.definition) if req in spec.requirements()
                   for d in spec.requirement(req).dtypes}
        metafunc.parametrize("dtype", [d for d in state.dtypes if d in covered] or state.dtypes)


@pytest.fixture(scope="session")
def impl(request) -> api.Driver:
    """The driver of the implementation under test."""
    return request.config.stash[state_key].impl()


@pytest.fixture(scope="session")
def peft_devices(request) -> list[str]:
    """The devices the run covers (--peft-device)."""
    return request.config.stash[state_key].devices


@pytest.fixture
def run(request) -> Run:
    """The test's driver, oracle, axis and verdict (conformance/engine/run.py)."""
    state = request.config.stash[state_key]
    device, dtype = outcomes.axis(request.node)
    return Run(state.impl(), state.oracle(), device, DTYPES[dtype], request.node.stash[verdict_key])


def pytest_runtest_setup(item):
    """Which of the test's requirements apply to the driver, by the registry alone; none: "not applicable"."""
    if not _is_suite_item(item):
        return
    state = item.config.stash[state_key]
    driver = state.impl()
    device, dtype = outcomes.axis(item)
    not_applicable, not_run = {}, {}
    for req in outcomes.claimed(item):
        requirement = spec.requirement(req)
        needed = set(requirement.capabilities) | ({"cuda"} if device.startswith("cuda") else set())
        missing = sorted(needed - set(driver.capabilities))
        if missing:
            not_applicable[req] = f"{driver.name} does not declare {', '.join(missing)}"
        elif dtype not in requirement.dtypes:  # a choice of the run, not a limit of the driver
            not_run[req] = f"checked on {', '.join(requirement.dtypes)} bases: add it to --peft-dtype"
    applicable = tuple(r for r in outcomes.claimed(item) if r not in not_applicable and r not in not_run)
    entries = state.expectations.for_test(outcomes.claimed(item), outcomes.cell(item)) if state.expectations else []
    item.stash[verdict_key] = Verdict(tuple(outcomes.claimed(item)), applicable, dtype, entries)
    item.stash[excluded_key] = {"not_applicable": not_applicable, "not_run": not_run}
    if not applicable:
        reasons = "; ".join(sorted(set(not_applicable.values()) | set(not_run.values())))
        pytest.skip((NOT_APPLICABLE if not_applicable else NOT_RUN) + reasons)


class TestTimeout(BaseException):
    """Raised into a test that ran past --peft-timeout. A BaseException, so that hypothesis does not catch it and
    call the hanging implementation again while shrinking; pytest records it as the test's failure. `found` is the
    first failure of the test, when hypothesis had found one and was shrinking it: the report shows that failure."""

    def __init__(self, message: str, found: Optional[BaseException] = None):
        super().__init__(message)
        self.found = found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Stop a test whose implementation hangs, fail it with a message, and go on (POSIX main thread only)."""
    seconds = item.config.stash[state_key].timeout
    main_thread = threading.current_thread() is threading.main_thread()
    first_failure = []
    hypothesis_handle = getattr(item.obj, "hypothesis", None) if _is_suite_item(item) else None
    if hypothesis_handle is not None:
        inner = hypothesis_handle.inner_test
        run = getattr(item, "funcargs", {}).get("run")
        hypothesis_handle.inner_test = _each_example(inner, first_failure, getattr(run, "verdict", None))
    usable = _is_suite_item(item) and hasattr(signal, "SIGALRM") and main_thread
    if not usable:
        try:
            yield
        finally:
            if hypothesis_handle is not None:
                hypothesis_handle.inner_test = inner
        return

    def stop(signum, frame):
        if first_failure:
            raise TestTimeout(f"stopped after {seconds:g} s (--peft-timeout) while hypothesis was shrinking a failure "
                              "it had found; reported here unshrunk", first_failure[0])
        raise TestTimeout(f"stopped after {seconds:g} s (--peft-timeout): the implementation under test did not "
                          "return; it hangs or is far too slow")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if hypothesis_handle is not None:
            hypothesis_handle.inner_test = inner


def _each_example(test, found: list, verdict=None):
    """`test` (hypothesis' inner test: one example) that keeps the first exception an example raised, so that a
    timeout during shrinking can still report the failure itself rather than "hangs", and lets the verdict treat a
    crash in a case an expectation's `when` covers as that expected failure."""
    @functools.wraps(test)
    def one_example(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except HypothesisException:  # reject() and assume(): not a failure
            raise
        except Exception as error:
            if verdict is not None and not isinstance(error, checks.ConformanceFailure):
                verdict.crashed()  # rejects the example when expected
            if not found:
                found.append(error)
            raise
    return one_example


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not _is_suite_item(item) or not item.config.stash[state_key].active:
        return
    if call.when == "teardown" or (call.when == "setup" and rep.passed):
        return
    state = item.config.stash[state_key]
    result = outcomes.build(item, call, rep, item.stash.get(verdict_key, None), item.stash.get(excluded_key, {}),
                            state)
    rep.user_properties.append(("peft_conformance", report.outcome_to_dict(result)))


class _Collector:
    """Gathers the outcomes, on the controller too when pytest-xdist runs the tests in workers."""

    def __init__(self, state: State):
        self.state = state

    def pytest_runtest_logreport(self, report):
        for key, value in getattr(report, "user_properties", ()):
            if key == "peft_conformance":
                self.state.active = True
                self.state.results.add(_outcome(value))

    def pytest_sessionfinish(self, session, exitstatus):
        expected = self.state.expectations
        if self.state.active and expected and expected.unused(self.state.results.outcomes):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _outcome(value) -> "report.TestOutcome":
    return report.outcome_from_dict(dict(value))


@pytest.hookimpl
def pytest_report_header(config):
    state = config.stash[state_key]
    if not state.impl_spec:
        return None
    seed = config.getoption("hypothesis_seed", None)
    draws = f" (random draws, --hypothesis-seed={seed})" if seed is not None else ""
    lines = [f"peft-conformance: implementation {state.impl_spec}, devices {','.join(state.devices)}, "
             f"dtypes {','.join(state.dtypes)}, hypothesis profile {state.profile}{draws}, torch {torch.__version__}"]
    if not torch.cuda.is_available():
        lines.append("peft-conformance: CUDA cases will NOT run: torch sees no GPU")
    oracle = state.oracle()
    found = f"peft {oracle.version}" if oracle else "NOT INSTALLED (oracle tests will not run)"
    lines.append(f"peft-conformance: oracle {found}")
    return lines


def _version(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _gpu() -> dict:
    """The GPU and CUDA a report's CUDA cells ran on (nothing on a CPU machine)."""
    if not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash[state_key]
    if not state.active:
        return
    results, driver = state.results, state.impl()
    print_summary(terminalreporter, results, driver)
    if state.expectations:
        for entry in state.expectations.unused(results.outcomes):
            terminalreporter.write_line(f"peft-conformance: ERROR: expectation {entry.describe()} in "
                                        f"{state.expectations.path} matched no test: remove or fix it", red=True)
        for entry in state.expectations.not_judged(results.outcomes):
            terminalreporter.write_line(f"peft-conformance: note: expectation {entry.describe()} in "
                                        f"{state.expectations.path} not judged: no test of this run checked its "
                                        "requirement on its axis")
        for entry in state.expectations.unexercised(results.outcomes):
            terminalreporter.write_line(f"peft-conformance: note: expectation {entry.describe()} in "
                                        f"{state.expectations.path}: no drawn case under its `when` failed this run "
                                        "(stale, or not drawn)", yellow=True)
    if state.report_path:
        oracle = state.oracle()
        data = report.to_json(results, {"name": driver.name, "version": driver.version, "entry": state.impl_spec,
                                        "capabilities": sorted(driver.capabilities)},
                              {"torch": torch.__version__, "transformers": _version("transformers"),
                               "devices": state.devices, "dtypes": state.dtypes,
                               "hypothesis_profile": state.profile, "oracle": oracle.version if oracle else None,
                               "cuda_available": torch.cuda.is_available(), **_gpu()})
        report.write(data, state.report_path)
        terminalreporter.write_line(f"peft-conformance: report written to {state.report_path}")
