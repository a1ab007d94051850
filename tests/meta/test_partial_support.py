"""A library that supports only part of peft and keeps a fused projection in its own layout (tests/split_driver.py,
the worked example of docs/plug-in-your-library.md) gets "pass" or "not applicable" on everything except what it
really does differently, which fails under the right requirement with a reproducer that runs when pasted."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_suite

# Three copies of A are three times the trainable A parameters (and other parameter names than peft's); its
# adapter_config.json holds only its own fields; its loader refuses base tensors in an adapter file.
REAL_DIFFERENCES = {"LORA-PARAM-001", "LORA-PARAM-002", "LORA-PARAM-003", "LORA-GOLD-008", "LORA-SER-005",
                    "LORA-KEYS-009", "LORA-LOAD-007"}
# Comparisons with peft that run only through the layout mapping (values in, gradients and files out).
THROUGH_THE_LAYOUT = ("LORA-FWD-001", "LORA-FWD-006", "LORA-GRAD-001", "LORA-KEYS-003", "LORA-SER-002",
                      "LORA-LOAD-002", "LORA-LOAD-003", "LORA-GOLD-002", "LORA-GOLD-003", "LORA-GOLD-006")


def test_only_real_differences_fail(tmp_path):
    """splitlora cannot unload, disable or hold a second adapter, its fresh c_attn adapter has no peft form (three
    different copies of A), and it refuses half precision: none of that may show as a failure, and nothing it
    claims may hide as "not run"."""
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite", "--peft-impl=tests.split_driver:SplitLoraDriver",
                       "--peft-profile=ci", "--peft-dtype=float32,bfloat16", f"--peft-report={report}")
    data = json.loads(report.read_text())
    statuses = {req: entry["status"] for req, entry in data["requirements"].items()}
    assert {req for req, status in statuses.items() if status == "fail"} == REAL_DIFFERENCES, result.stdout[-4000:]
    others = {req: status for req, status in statuses.items() if status not in ("pass", "fail", "not applicable")}
    assert others == {}, others
    for req in THROUGH_THE_LAYOUT:
        assert statuses[req] == "pass", req
    reasons = {r for entry in data["requirements"].values() for r in entry["reasons"]}
    assert "splitlora adapts c_attn and c_fc only, not c_proj" in reasons  # its own scope, by name
    half = data["requirements"]["LORA-MERGE-009"]  # checked on half-precision bases only: refused by its scope
    assert half["status"] == "not applicable" and "splitlora computes in float32 only" in half["reasons"][0], half
    assert "SUITE BUG" not in result.stdout

    repro = data["requirements"]["LORA-PARAM-001"]["failures"][0]["repro"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PEFT_CONFORMANCE_IMPL")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    pasted = subprocess.run(["bash", "-c", repro], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert pasted.returncode == 1, pasted.stdout[-2000:]
    assert "LORA-PARAM-001 failed: (trainable, total)" in pasted.stdout
