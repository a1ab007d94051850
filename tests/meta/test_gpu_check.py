"""scripts/gpu-check.sh, the check prepared for a lent GPU machine, run here on its CPU path: every step of it works
before a GPU is lent, and it leaves no more files than such a machine sends back (8)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_gpu_check_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DEVICES": "cpu", "JOBS": "0", "PROFILE": "quick", "MUTANTS": "BranchInBaseDtype",
           "SUITE_ARGS": '-k "test_disable_adapter_gives_base_output or test_outputs_are_peft_s"',
           "BENCH_ARGS": "--forward-only --quick --smoke", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    logs = "".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:] + logs
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["env.txt", "extras.log", "peft.json", "peft.md", "reference.json", "reference.md",
                       "suite.log"]
    for impl in ("reference", "peft"):
        report = json.loads((tmp_path / f"{impl}.json").read_text())
        assert report["environment"]["dtypes"] == ["float32", "bfloat16", "float16"]
        disabled = report["requirements"]["LORA-FWD-007"]
        assert disabled["axes"] == {"cpu/float32": "pass", "cpu/bfloat16": "pass", "cpu/float16": "pass"}, impl
        assert report["requirements"]["LORA-GOLD-003"]["status"] == "pass"
        assert set(report["tolerance_classes"]) >= {"bf16", "fp16", "golden"}
    extras = (tmp_path / "extras.log").read_text()
    assert "BranchInBaseDtype" in extras and "killed" in extras and "benchmark: exit 0" in extras
    assert "torch" in (tmp_path / "env.txt").read_text() and "GPU check: passed" in done.stdout
