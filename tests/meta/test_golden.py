"""The golden fixtures: intact, complete, small, and a gate that catches tampering and drift."""

import json
import shutil

import pytest

from conformance import golden, spec
from conformance.zoo import models
from tests.conftest import ROOT, run_suite


def test_fixtures_match_their_lock_and_stay_small():
    assert golden.is_packed(golden.source()) and golden.verify() == []
    # Each version records every case again, plus the consumer corpus: 7.0 MB unpacked with v4, 3.0 MB packed
    # (316 distinct contents of 775 files). The packed form is what ships.
    assert sum(p.stat().st_size for p in golden.fixture_files(golden.source())) < 5_000_000


def test_the_store_holds_each_content_once_and_unpacks_to_its_lock():
    locked = golden.read_lock(golden.source())
    objects = [p for p in (golden.source() / golden.OBJECTS).rglob("*") if p.is_file()]
    assert sorted(p.name for p in objects) == sorted(set(locked.values()))
    tree = golden.root()
    assert tree != golden.source() and golden.read_lock(tree) == locked
    assert {str(p.relative_to(tree)): golden.sha256(p) for p in golden.fixture_files(tree)} == locked


@pytest.mark.parametrize("damage, expected", [
    ("flip", "sha256 differs from its name (the content of "), ("remove", "is missing from objects/"),
    ("extra", "not in FIXTURES.lock"), ("loose", "not part of a packed fixtures folder")])
def test_a_damaged_store_fails_verify(tmp_path, damage, expected):
    copy = tmp_path / "fixtures"
    shutil.copytree(golden.source(), copy)
    target = sorted((copy / golden.OBJECTS).glob("*"))[0]
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        target.write_bytes(bytes(data))
    elif damage == "remove":
        target.unlink()
    elif damage == "extra":
        (target.parent / ("0" * 64)).write_bytes(b"not locked")
    else:
        (copy / "v1").mkdir()
        (copy / "v1" / "stray.json").write_text("{}")
    problems = golden.verify(copy)
    assert len(problems) == 1 and expected in problems[0], problems
    from typer.testing import CliRunner

    from conformance.cli import app
    result = CliRunner().invoke(app, ["fixtures", "verify", "--folder", str(copy)])
    assert result.exit_code == 1 and expected in result.output


def test_every_case_has_its_files_and_manifest():
    cases = golden.cases()
    assert len({c.name for c in cases}) >= 12
    for case in cases:
        manifest = case.manifest
        assert {"peft", "torch", "transformers"} <= set(manifest["producer"])
        assert set(manifest["keys"][case.adapter_name]) == set(case.tensors())
        assert set(case.expected()) >= {"unmerged", "merged", "disabled"}
        if "attention_mask" in case.inputs():  # token inputs are padded (tensor inputs: the MoE, the attention net)
            assert case.inputs()["attention_mask"].min() == 0
        for name, digest in manifest["files"].items():
            assert golden.sha256(case.path / name) == digest, f"{case.id}: {name}"


def test_tampered_tensor_fails_the_run_naming_case_and_requirement(tmp_path):
    copy = tmp_path / "fixtures"
    shutil.copytree(golden.root(), copy)
    target = copy / "v1/cases/r4-c_attn/adapter/adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    target.write_bytes(bytes(data))
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite.test_gold", "--peft-impl=reference", f"--peft-report={report}",
                       env={golden.ENV_ROOT: str(copy)})
    assert result.returncode == 1
    failures = json.loads(report.read_text())["requirements"]["LORA-GOLD-001"]["failures"]
    assert any("v1/r4-c_attn" in f["message"] for f in failures), failures


def test_a_driver_one_logit_off_by_1e_3_fails(tmp_path):
    report = tmp_path / "report.json"
    result = run_suite("--pyargs", "conformance.suite.test_gold::test_outputs_are_peft_s",
                       "--peft-impl=tests.mutants:OneLogitOff", f"--peft-report={report}")
    assert result.returncode == 1
    entry = json.loads(report.read_text())["requirements"]["LORA-GOLD-003"]
    assert entry["status"] == "fail" and "v1/r4-c_attn: logits" in result.stdout
    assert entry["worst"]["max_abs"] == pytest.approx(1e-3, rel=0.01)


def test_generate_refuses_to_overwrite_and_records_a_new_version(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    copy = tmp_path / "fixtures"  # packed, as stored: the new version's new contents are added to its objects
    shutil.copytree(golden.source(), copy)
    monkeypatch.setenv(golden.ENV_CACHE, str(tmp_path / "cache"))
    with pytest.raises(FileExistsError, match="never rewritten"):
        golden.generate(copy, "v1")
    version, changed = golden.generate(copy)
    # Same peft, torch and transformers: the same keys, tensors and configs. Logits may move in the last bits on
    # another CPU (vector kernels differ), never beyond the tolerance class the gate applies.
    assert version == f"v{len(golden.versions(ROOT / 'fixtures')) + 1}"
    # The zoo's own classes moved once (conformance/models.py -> conformance/zoo/models.py, #30): peft records
    # their module in auto_mapping, which diff names apart from behaviour.
    moved = [line for line in changed if line != "no change" and not line.endswith(golden.diff.MOVED_CLASS)]
    assert all(" logits moved by " in line for line in moved), moved
    assert all(float(line.rsplit(" ", 1)[1]) <= spec.tolerances()["golden"].atol for line in moved), moved
    assert golden.verify(copy) == [] and golden.is_packed(copy)
    assert (golden.unpacked(copy) / version).is_dir()
    assert golden.read_lock(copy).keys() > golden.read_lock(ROOT / "fixtures").keys()


def _export_results(results, nudge: float = 0.0):
    """What a library in its own venv would do: load each case, compute, write logits and the adapter again."""
    import reference_impl
    from safetensors.torch import save_file

    for case in golden.cases():
        if case.adapter_name != "default":
            continue
        model = reference_impl.PeftModel.from_pretrained(case.base_model(), case.adapter_dir())
        logits = models.output_tensor(model(**case.inputs())).detach()
        logits.view(-1)[0] += nudge
        target = results / case.version / case.name
        target.mkdir(parents=True)
        save_file({"unmerged": logits.contiguous()}, target / "logits.safetensors")
        model.save_pretrained(target / "adapter")


def test_golden_results_from_another_process(tmp_path):
    from typer.testing import CliRunner

    from conformance.cli import app

    _export_results(tmp_path / "good")
    result = CliRunner().invoke(app, ["golden-check", str(tmp_path / "good")])
    assert result.exit_code == 1  # the named-adapter cases were skipped by the exporter: reported missing
    named = [case.id for case in golden.cases() if case.adapter_name != "default"]
    for case_id in named:
        assert f"FAIL LORA-GOLD-003 {case_id}: no {tmp_path / 'good' / case_id / 'logits.safetensors'}" in result.output
    fails = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert fails and all(any(f" {case_id}: " in line for case_id in named) for line in fails), fails
    _export_results(tmp_path / "off", nudge=1e-3)
    result = CliRunner().invoke(app, ["golden-check", str(tmp_path / "off")])
    assert "FAIL LORA-GOLD-003 v1/r4-c_attn: case v1/r4-c_attn: unmerged logits" in result.output


def test_llava_bases_load_under_either_transformers_major():
    """Transformers 5 dropped a level from LLaVA's vision tower (`vision_tower.vision_model.*` became
    `vision_tower.*`): stored weights named either way load into the zoo's llava under the installed major, and
    load into nothing else (docs/plug-in-your-library.md checks a library under transformers 4.57.6)."""
    model = models.build("llava")
    own = model.state_dict()
    five, four = golden.RENAMED_PATHS[0]
    theirs = four if any(k.startswith(four) for k in own) else five  # how this transformers names them
    other = five if theirs == four else four
    renamed = {(other + k[len(theirs):] if k.startswith(theirs) else k): v for k, v in own.items()}
    assert set(renamed) != set(own)  # the other major's names really differ
    assert set(golden.in_this_transformers(renamed, model)) == set(own)
    assert set(golden.in_this_transformers({"model.vision_tower.nothing": 0}, model)) == {"model.vision_tower.nothing"}
