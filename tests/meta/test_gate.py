"""record and verify: goldens of a user's own model and adapters, and what verify says when something moves."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conformance.cli import app
from tests import own_model

runner = CliRunner()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    adapters = own_model.write_adapters(root / "adapters")
    result = runner.invoke(app, ["record", str(root / "goldens"), "--base", "tests.own_model:build",
                                 *[arg for path in adapters for arg in ("--adapter", str(path))]])
    assert result.exit_code == 0, result.output
    return root / "goldens"


def _verify(folder, *extra):
    return runner.invoke(app, ["verify", str(folder), *extra])


@pytest.mark.req("LORA-GOLD-001", "LORA-GOLD-003", "LORA-GOLD-004", "LORA-GOLD-005", "LORA-GOLD-006")
def test_a_recorded_folder_verifies_with_peft_and_with_reference_impl(recorded, tmp_path):
    manifest = json.loads((recorded / "golden.json").read_text())
    assert [c["name"] for c in manifest["cases"]] == ["proj-r4", "all-r2-rslora"]
    assert manifest["base"] == {"source": "tests.own_model:build", "kind": "factory", "seed": 0, "files": None}
    for impl in ("peft", "reference"):
        result = _verify(recorded, "--impl", impl, "--report", str(tmp_path / f"{impl}.json"))
        assert result.exit_code == 0, result.output
        statuses = {req: r["status"] for req, r in json.loads((tmp_path / f"{impl}.json").read_text())
                    ["requirements"].items()}
        assert statuses == dict.fromkeys(("LORA-GOLD-001", "LORA-GOLD-003", "LORA-GOLD-004", "LORA-GOLD-005",
                                          "LORA-GOLD-006"), "pass"), statuses
    result = runner.invoke(app, ["record", str(recorded), "--base", "tests.own_model:build", "--adapter", "x"])
    assert result.exit_code == 2 and "never overwrites" in result.output


def test_one_changed_byte_of_an_adapter_fails_naming_case_and_requirement(recorded, tmp_path):
    folder = tmp_path / "goldens"
    shutil.copytree(recorded, folder)
    path = folder / "cases" / "proj-r4" / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    result = _verify(folder)
    assert result.exit_code == 1
    assert "FAIL LORA-GOLD-001 proj-r4: case proj-r4: cases/proj-r4/adapter/adapter_model.safetensors: sha256 " \
           "differs" in result.output
    assert "moved: case proj-r4: unmerged outputs moved by" in result.output
    assert "all-r2-rslora:" not in "\n".join(line for line in result.output.splitlines() if line.startswith("FAIL"))


def test_one_expected_logit_off_by_1e_3_fails(recorded, tmp_path):
    folder = tmp_path / "goldens"
    shutil.copytree(recorded, folder)
    path = folder / "cases" / "all-r2-rslora" / "expected.safetensors"
    expected = load_file(path)
    expected["unmerged"].view(-1)[0] += 1e-3
    save_file(expected, path, metadata={"format": "pt"})
    result = _verify(folder)
    assert result.exit_code == 1
    assert "FAIL LORA-GOLD-001 all-r2-rslora: case all-r2-rslora: cases/all-r2-rslora/expected.safetensors" \
        in result.output
    assert "moved: case all-r2-rslora: unmerged outputs moved by 0.000999" in result.output  # float32 rounding of +1e-3


def test_a_moved_output_within_tolerance_is_said_not_failed(recorded, tmp_path):
    """An implementation whose arithmetic differs in the last bits: verify passes and says by how much."""
    result = _verify(recorded, "--impl", "reference")
    assert result.exit_code == 0
    assert "moved: implementation: reference" in result.output


def test_a_directory_base_is_referenced_by_hash_and_its_change_fails(tmp_path):
    from conformance.zoo import models

    base = tmp_path / "base"
    models.build("gpt2-tiny").save_pretrained(base)
    adapter = tmp_path / "adapter"
    shutil.copytree(__import__("conformance").golden.root() / "v1" / "cases" / "r4-c_attn" / "adapter", adapter)
    result = runner.invoke(app, ["record", str(tmp_path / "goldens"), "--base", str(base), "--adapter", str(adapter)])
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "goldens").rglob("model.safetensors"))  # referenced, not copied
    assert _verify(tmp_path / "goldens").exit_code == 0
    weights = load_file(base / "model.safetensors")
    key = sorted(weights)[0]
    weights[key] = weights[key] + 1
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    result = _verify(tmp_path / "goldens")
    assert result.exit_code == 1 and "model.safetensors: sha256 differs from the one recorded" in result.output


def test_bad_input_is_a_usage_error(tmp_path):
    result = runner.invoke(app, ["record", str(tmp_path / "g"), "--base", "nothing", "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "module:factory" in result.output
    result = runner.invoke(app, ["record", str(tmp_path / "g"), "--base", "tests.own_model:build",
                                 "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "no adapter_config.json" in result.output
    assert not (tmp_path / "g").exists()
    assert _verify(tmp_path).exit_code == 2


def test_goldens_recorded_in_one_folder_verify_from_a_copy_elsewhere(tmp_path):
    """The base directory is recorded relative to the golden folder: a project copied (cloned) elsewhere verifies;
    goldens copied without their base say which base is missing and how to give its new place."""
    from conformance.zoo import models

    project = tmp_path / "here" / "project"
    models.build("gpt2-tiny").save_pretrained(project / "models" / "base")
    adapter = project / "adapters" / "a"
    shutil.copytree(__import__("conformance").golden.root() / "v1" / "cases" / "r4-c_attn" / "adapter", adapter)
    result = runner.invoke(app, ["record", str(project / "goldens"), "--base", str(project / "models" / "base"),
                                 "--adapter", str(adapter)])
    assert result.exit_code == 0, result.output
    assert json.loads((project / "goldens" / "golden.json").read_text())["base"]["source"] == "../models/base"
    elsewhere = tmp_path / "there" / "project"
    shutil.copytree(project, elsewhere)
    shutil.rmtree(project)
    assert _verify(elsewhere / "goldens").exit_code == 0

    alone = tmp_path / "alone" / "goldens"
    shutil.copytree(elsewhere / "goldens", alone)
    result = _verify(alone)
    assert result.exit_code == 2
    assert "the base model directory" in result.output and "'../models/base'" in result.output
    assert "--base DIR" in result.output and "sha256" not in result.output
    assert _verify(alone, "--base", str(elsewhere / "models" / "base")).exit_code == 0
    result = _verify(alone, "--base", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "no config.json" in result.output
