"""Shared fixtures of the project's own tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tiny_gpt2():
    """The tiny GPT-2 of the research notes ("TG2"): seed 0, width 32, 2 layers, vocab 100, eval mode."""
    from conformance.zoo import models

    return lambda: models.build("gpt2-tiny", 0)


@pytest.fixture
def token_ids():
    return torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def run_suite(*args: str, timeout: int = 600, env: dict = None) -> subprocess.CompletedProcess:
    """Run the conformance suite in a fresh interpreter, this checkout first on the path."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}  # the tests themselves run in parallel
    env.pop("PEFT_CONFORMANCE_IMPL", None)
    # float32 unless a test asks for more: these runs check the suite's machinery, and the whole-suite runs that
    # judge a driver name their dtypes (the last --peft-dtype given wins)
    command = [sys.executable, "-m", "pytest", "-p", "conformance.plugin", "-p", "no:cacheprovider",
               "--peft-profile=quick", "--peft-dtype=float32", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
