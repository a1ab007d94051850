"""The consumer kit: corpus export, golden-check --corpus on results from another process, the plain-torch worked
example of docs/consumers.md run as written, the shipped consumers, and check-adapter against a base directory."""

import json
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conformance import golden
from conformance.adapter_kit.check_adapter import check
from conformance.cli import app
from conformance.consumer_kit import consumers, corpus
from reference_impl.peft_format import PREFIX
from tests.conftest import ROOT

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    target = tmp_path_factory.mktemp("corpus") / "corpus"
    result = runner.invoke(app, ["corpus", "export", str(target)])
    assert result.exit_code == 0, result.output
    return target


def _subset(exported, tmp_path, names):
    """A copy of the corpus whose manifest lists only `names`."""
    target = tmp_path / "subset"
    shutil.copytree(exported, target)
    manifest = json.loads((target / "corpus.json").read_text())
    manifest["cases"] = [c for c in manifest["cases"] if c["name"] in names]
    (target / "corpus.json").write_text(json.dumps(manifest))
    return target


def _golden_check(results, corpus_dir, *extra):
    return runner.invoke(app, ["golden-check", str(results), "--corpus", str(corpus_dir), *extra])


def test_the_exported_corpus_follows_its_published_schema(exported):
    manifest = json.loads((exported / "corpus.json").read_text())
    assert corpus.validation_errors(manifest) == []
    assert json.loads((exported / "corpus.schema.json").read_text())["$id"] == corpus.SCHEMA
    features = {f for case in manifest["cases"] for f in case["features"]}
    assert {"rslora", "rank_pattern", "alpha_pattern", "dora", "lora_embedding", "modules_to_save",
            "layers_to_transform", "adapter_name", "lora_bias", "bf16_adapter", "prefixed_language_model"} <= features
    assert {"kohya", "conv_lora", "alpha_per_module", "no_alpha", "text_encoder"} <= features
    for case in corpus.read(exported):
        assert not torch.equal(case.expected()["unmerged"], case.expected()["disabled"]), case.name  # it does something
        assert set(case.expected()) == set(case.manifest["outputs"])
        if case.kind == "diffusion":
            assert case.manifest["adapter_format"] == "kohya" and set(case.manifest["outputs"]) == {
                "unmerged", "merged", "disabled", "weighted"}
            assert (case.base_dir / "unet" / "config.json").is_file() and (case.base_dir / "text_encoder").is_dir()
            assert all(key.startswith(("lora_unet_", "lora_te_")) for key in load_file(case.adapter_dir)), case.name
            continue
        assert (case.adapter_dir / "adapter_config.json").is_file() and (case.base_dir / "tokenizer.model").is_file()
        assert set(case.expected()) == {"unmerged", "merged", "disabled"}
        dtypes = {t.dtype for t in case.tensors().values()}
        assert dtypes == {getattr(torch, case.manifest["adapter_dtype"])}, case.name
    broken = {**manifest, "cases": [{**manifest["cases"][0], "outputs": ["logits"]}]}
    assert any("outputs" in problem for problem in corpus.validation_errors(broken))


def test_export_never_overwrites_and_never_exports_a_damaged_corpus(exported, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = runner.invoke(app, ["corpus", "export", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "never overwrites" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    fixtures = tmp_path / "fixtures"
    shutil.copytree(golden.root(), fixtures)
    tampered = next((corpus.stored(fixtures) / "cases").iterdir()) / "expected.safetensors"  # the newest
    tampered.write_bytes(tampered.read_bytes()[:-4] + b"\0\0\0\0")
    result = runner.invoke(app, ["corpus", "export", str(tmp_path / "out"), "--folder", str(fixtures)])
    assert result.exit_code == 1 and "does not match FIXTURES.lock" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.req("LORA-CONS-001", "LORA-CONS-002", "LORA-CONS-003")
def test_a_new_corpus_version_keeps_an_earlier_recording_of_an_unchanged_case(tmp_path):
    """Recorded again, an unchanged case differs only by float noise and by the order peft writes target_modules in:
    the new version keeps the earlier files (the store keeps them once); a case whose outputs or inputs changed keeps
    its new recording."""
    stored = corpus.stored()
    earlier, new = tmp_path / "corpus", tmp_path / "new"
    shutil.copytree(stored, earlier / "v1")
    shutil.copytree(stored, new)
    names = {"noise": "llama-all-linear", "changed": "llama-dora", "new inputs": "gpt2-c_attn"}
    for name in names.values():
        expected = load_file(new / "cases" / name / "expected.safetensors")
        step = 1e-7 if name == names["noise"] else 1e-2
        save_file({k: v + step for k, v in expected.items()}, new / "cases" / name / "expected.safetensors")
    config_path = new / "cases" / names["noise"] / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = sorted(config["target_modules"], reverse=True)
    config_path.write_text(json.dumps(config))
    inputs = load_file(new / "cases" / names["new inputs"] / "inputs.safetensors")
    save_file({k: v.flip(-1).contiguous() for k, v in inputs.items()},
              new / "cases" / names["new inputs"] / "inputs.safetensors")
    before = {name: (new / "cases" / name / "expected.safetensors").read_bytes() for name in names.values()}
    manifest = json.loads((new / corpus.MANIFEST).read_text())
    for entry in manifest["cases"]:
        corpus._keep_an_earlier_recording(entry, new, earlier)
    kept = lambda name, file: (new / "cases" / name / file).read_bytes()  # noqa: E731
    assert kept(names["noise"], "expected.safetensors") == (stored / "cases" / names["noise"] / "expected.safetensors"
                                                           ).read_bytes()
    assert kept(names["noise"], "adapter/adapter_config.json") == (
        stored / "cases" / names["noise"] / "adapter" / "adapter_config.json").read_bytes()
    for name in (names["changed"], names["new inputs"]):
        assert kept(name, "expected.safetensors") == before[name]


def test_reference_consumer_passes_and_one_flipped_sign_fails(exported, tmp_path):
    consumers.run("reference", exported, tmp_path / "good")
    result = _golden_check(tmp_path / "good", exported, "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert {req: report["requirements"][req]["status"] for req in ("LORA-CONS-001", "LORA-CONS-002",
                                                                   "LORA-CONS-003")} == dict.fromkeys(
        ("LORA-CONS-001", "LORA-CONS-002", "LORA-CONS-003"), "pass")
    assert report["requirements"]["LORA-FWD-002"]["status"] == "pass"  # credited by the rslora case
    assert (tmp_path / "report.md").is_file() and report["implementation"]["name"] == "reference"

    flipped = tmp_path / "flipped"
    shutil.copytree(exported, flipped)
    adapter = next(c for c in corpus.read(flipped) if c.name == "llama-rslora").adapter_dir
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = -tensors[key]
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    consumers.run("reference", flipped, tmp_path / "bad", only=("llama-rslora",))
    result = _golden_check(tmp_path / "bad", exported)
    assert result.exit_code == 1
    assert "FAIL LORA-CONS-001 llama-rslora: case llama-rslora: unmerged logits differs" in result.output
    assert "FAIL LORA-CONS-002 llama-rslora: case llama-rslora: merged logits differs" in result.output
    assert "LORA-CONS-003 llama-rslora" not in result.output  # disabled is still the base
    assert "FAIL LORA-CONS-001 llama-q_proj+v_proj: no " in result.output  # not computed: silence is not a pass


def test_the_worked_example_in_the_docs_runs_as_written(exported, tmp_path):
    text = (ROOT / "docs" / "consumers.md").read_text()
    block = re.search(r"<!-- worked-example -->\n```python\n(.*?)```", text, re.S).group(1)
    assert "peft" not in block.replace("peft-conformance", "")  # no peft, no peft_conformance: plain torch
    (tmp_path / "consumer.py").write_text(block)
    done = subprocess.run([sys.executable, str(tmp_path / "consumer.py"), str(exported), str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = _golden_check(tmp_path / "results", exported, "--report", str(tmp_path / "report.json"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
    assert outcomes["llama-rslora::unmerged"] == "passed" and outcomes["gpt2-c_attn::merged"] == "passed"
    assert outcomes["llama-dora::unmerged"] == "not applicable"
    passed = sum(outcome == "passed" for outcome in outcomes.values())
    assert f"It passes the {passed // 3} cases it handles ({passed} outputs)" in text


def test_expectations_name_known_departures_and_cannot_go_stale(exported, tmp_path):
    consumers.run("reference", exported, tmp_path / "results", only=("llama-rslora", "llama-dora"))
    for name in ("unmerged", "merged"):  # a consumer that ignores rsLoRA, simulated: its logits moved
        path = tmp_path / "results" / "llama-rslora" / "logits.safetensors"
        logits = load_file(path)
        logits[name] = logits[name] + 0.5
        save_file(logits, path)
    expectations = tmp_path / "known.toml"
    entries = [("LORA-CONS-001", "llama-rslora"), ("LORA-FWD-002", "llama-rslora"), ("LORA-CONS-002", "llama-rslora")]
    expectations.write_text("".join(f'[[expect]]\nreq = "{req}"\nstatus = "fail"\nwhere = {{ id = "{case}" }}\n'
                                    f'reason = "ignores use_rslora"\n\n' for req, case in entries))
    only_two = _subset(exported, tmp_path, ("llama-rslora", "llama-dora"))
    result = _golden_check(tmp_path / "results", only_two, "--expectations", str(expectations))
    assert result.exit_code == 0, result.output
    assert "XFAIL LORA-CONS-001 llama-rslora" in result.output
    stale = expectations.read_text().replace("llama-rslora", "llama-dora")  # llama-dora passes: stale entries
    expectations.write_text(stale)
    result = _golden_check(tmp_path / "results", only_two, "--expectations", str(expectations))
    assert result.exit_code == 1 and "is expected to fail" in result.output and "but passed" in result.output


def test_transformers_loader_consumer_departs_only_as_its_expectations_say(exported, tmp_path):
    """transformers' load_adapter on this stack: with transformers 5 and peft < 0.22 the departures recorded in
    expectations/consumers/transformers.toml (strict: an entry whose case passes fails), with 4.x none at all."""
    import peft
    import transformers

    names = ("llama-rslora", "llama-dora", "llama-adapter-named-custom")
    consumers.run("transformers", exported, tmp_path / "results", only=names)
    known = transformers.__version__ >= "5" and peft.__version__ < "0.22"
    extra = ["--expectations", str(ROOT / "expectations" / "consumers" / "transformers.toml")] if known else []
    result = _golden_check(tmp_path / "results", _subset(exported, tmp_path, names), *extra)
    assert result.exit_code == 0, result.output
    if known:
        assert "XFAIL LORA-CONS-001 llama-dora" in result.output
        assert "XFAIL LORA-CONS-003 llama-rslora: the consumer failed to compute it: ValueError: The version of PEFT" \
            in result.output


def test_diffusers_consumer_departs_only_as_its_expectations_say(exported, tmp_path):
    """diffusers' load_lora_weights over the kohya cases: one that passes and the three recorded departures
    (expectations/consumers/diffusers.toml, strict), on this project's pins."""
    diffusers = pytest.importorskip("diffusers")
    if diffusers.__version__ != "0.42.1":
        pytest.skip(f"the expectations are for diffusers 0.42.1, not {diffusers.__version__}")
    names = ("sd-kohya-locon", "sd-kohya-alpha-per-module", "sd-kohya-text-encoder-mlp", "sd-kohya-text-encoder-alpha")
    consumers.run("diffusers", exported, tmp_path / "results", only=names)
    result = _golden_check(tmp_path / "results", _subset(exported, tmp_path, names), "--report",
                           str(tmp_path / "report.json"),
                           "--expectations", str(ROOT / "expectations" / "consumers" / "diffusers.toml"))
    assert result.exit_code == 0, result.output
    for case in names[1:]:
        assert f"XFAIL LORA-CONS-001 {case}" in result.output
    statuses = {req: entry["status"] for req, entry in json.loads((tmp_path / "report.json").read_text())[
        "requirements"].items()}
    assert statuses["LORA-KOHYA-001"] == statuses["LORA-KOHYA-002"] == "expected fail"  # the format's own, charged


def test_llama_cpp_converter_refusal_is_not_applicable_with_its_message(tmp_path, monkeypatch):
    from conformance.consumer_kit.consumers import NotApplicable, llama_cpp

    (tmp_path / "gguf-py").mkdir()
    (tmp_path / "convert_lora_to_gguf.py").write_text(
        "import sys\nprint(\"ERROR:lora-to-gguf:Unexpected name 'x.lora_magnitude_vector'\", file=sys.stderr)\n"
        "sys.exit(1)\n")
    monkeypatch.setenv(llama_cpp.SOURCE_ENV, str(tmp_path))
    llama_cpp.source.cache_clear()
    with pytest.raises(NotApplicable, match="convert_lora_to_gguf.py refuses it: .*lora_magnitude_vector"):
        llama_cpp._convert("convert_lora_to_gguf.py", ["adapter"], tmp_path / "out.gguf")
    llama_cpp.source.cache_clear()


# --- check-adapter against a base directory ---------------------------------------------------------------------

@pytest.fixture
def config_only_base(exported, tmp_path):
    folder = tmp_path / "llama-config-only"
    folder.mkdir()
    shutil.copy(exported / "bases" / "llama" / "config.json", folder)
    return folder


def _adapter(exported, tmp_path, case="llama-q_proj+v_proj", tensors=None, config=None):
    target = tmp_path / "adapter"
    shutil.copytree(next(c for c in corpus.read(exported) if c.name == case).adapter_dir, target)
    if tensors:
        path = target / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    if config:
        path = target / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    return target


def _findings(adapter, base):
    result = runner.invoke(app, ["check-adapter", str(adapter), "--base", str(base), "--json"])
    return result.exit_code, json.loads(result.output)["findings"]


def test_check_adapter_passes_a_good_adapter_on_a_config_only_base(exported, tmp_path, config_only_base):
    code, findings = _findings(_adapter(exported, tmp_path), config_only_base)
    assert code == 0, findings
    assert [f["code"] for f in findings] == ["numbers.no-weights"]


def test_check_adapter_flags_a_wrong_prefix_as_silently_inert(exported, tmp_path, config_only_base):
    adapter = _adapter(exported, tmp_path, tensors=lambda t: {
        k.replace(f"{PREFIX}model.", f"{PREFIX}model.model."): v for k, v in t.items()})
    code, findings = _findings(adapter, config_only_base)
    assert code == 1
    assert [f["code"] for f in findings if f["level"] == "error"] == ["keys.inert"]  # once, not once per tensor
    message = findings[0]["message"]
    assert "silently do nothing" in message and "the base has 'model.layers.0.self_attn.q_proj'" in message
    assert "--base is probably wrong" in message


def test_check_adapter_finds_tensors_the_config_has_no_place_for(exported, tmp_path, config_only_base):
    def add(tensors):
        biases = {k.replace("lora_B.weight", "lora_B.bias"): torch.ones(v.shape[0]) for k, v in tensors.items()
                  if "lora_B" in k}
        return {**tensors, **biases, f"{PREFIX}model.norm.weight": torch.ones(32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings are not warnings: no filter hides them
        report = check(_adapter(exported, tmp_path, tensors=add), str(config_only_base))
    unplaced = [f for f in report if f.code == "keys.unplaced"]
    assert sum(f.level == "error" and "lora_B.bias" in f.message for f in unplaced) == 4
    assert any(f.level == "warning" and "model.norm" in f.message and "not in modules_to_save" in f.message
               for f in unplaced)
    assert not report.ok


def test_check_adapter_names_every_resized_tensor(exported, tmp_path, config_only_base):
    adapter = _adapter(exported, tmp_path, tensors=lambda t: {
        **t, f"{PREFIX}lm_head.weight": torch.zeros(104, 32),
        f"{PREFIX}model.embed_tokens.weight": torch.zeros(104, 32)},
        config=lambda c: {**c, "modules_to_save": ["lm_head", "embed_tokens"]})
    code, findings = _findings(adapter, config_only_base)
    assert code == 1
    mismatches = [f["message"] for f in findings if f["code"] == "shape.mismatch"]
    assert len(mismatches) == 2 and all("(104, 32), the base's" in m and "(100, 32)" in m for m in mismatches)
    assert any(f["code"] == "base.resize" and "resize the base" in f["message"] for f in findings)


def test_check_adapter_lists_every_invalid_pattern_entry(exported, tmp_path, config_only_base):
    adapter = _adapter(exported, tmp_path, config=lambda c: {
        **c, "rank_pattern": {"q_proj": 0, "(": 4}, "alpha_pattern": {"v_proj": -1, "q_proj": "big"}})
    code, findings = _findings(adapter, config_only_base)
    bad = [f["message"] for f in findings if f["code"] == "config.pattern"]
    assert code == 1 and len(bad) == 4, bad
    assert any("rank_pattern['q_proj'] = 0" in m for m in bad) and any("'(' is not a regular expression" in m
                                                                        for m in bad)


def test_check_adapter_says_what_consumers_commonly_ignore(exported, tmp_path):
    for case, code in (("llama-rslora", "consumer.rslora"), ("llama-alpha_pattern", "consumer.alpha-pattern"),
                       ("llama-dora", "consumer.dora"), ("llama-modules_to_save-lm_head", "consumer.modules-to-save")):
        found, findings = _findings(_adapter(exported, tmp_path / case, case), exported / "bases" / "llama")
        assert found == 0 and code in {f["code"] for f in findings}, (case, findings)
        assert any(f["code"] == "numbers.peft" and f["level"] == "info" for f in findings), findings  # with weights


def test_check_adapter_base_forms(exported, tmp_path):
    result = runner.invoke(app, ["check-adapter", str(_adapter(exported, tmp_path)), "--base", "json"])
    assert result.exit_code == 2
    assert "a model directory holding config.json" in result.output and "module:factory" in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["check-adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no config.json" in result.output


@pytest.mark.parametrize("report, label", [("consumer-reference", "reference_impl"),
                                           ("consumer-transformers4", "transformers 4.57.6 `load_adapter`"),
                                           ("consumer-transformers", "transformers 5.24.0 `load_adapter`"),
                                           ("consumer-llama-cpp", "llama.cpp (llama-cpp-python 0.3.36)"),
                                           ("consumer-diffusers", "diffusers 0.42.1 `load_lora_weights`")])
def test_readme_consumer_figures_come_from_the_recorded_reports(report, label):
    recorded = json.loads((ROOT / "docs" / "matrix" / "consumers" / f"{report}.json").read_text())
    unmerged = [t for t in recorded["tests"] if t["test"].endswith("::unmerged")]
    passed = sum(t["outcome"] == "passed" for t in unmerged)
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(f"| {label}"))
    assert f"| {passed} of {len(unmerged)}" in row, row
    assert recorded["summary"]["fail"] == 0  # every departure is in the consumer's expectations file, with a reason


def test_worked_example_line_count_in_the_readme():
    block = re.search(r"<!-- worked-example -->\n```python\n(.*?)```", (ROOT / "docs" / "consumers.md").read_text(),
                      re.S).group(1)
    count = len(block.splitlines())
    assert f"plain-torch consumer in {count}" in (ROOT / "README.md").read_text().replace("\n", " ")
    assert f"The {count} lines of" in (ROOT / "docs" / "consumer-findings.md").read_text()


def test_check_adapter_without_base_says_once_that_the_default_base_is_probably_wrong(exported, tmp_path):
    result = runner.invoke(app, ["check-adapter", str(_adapter(exported, tmp_path)), "--json"])
    errors = [f for f in json.loads(result.output)["findings"] if f["level"] == "error"]
    assert result.exit_code == 1 and [f["code"] for f in errors] == ["keys.inert"], errors
    assert "zoo model gpt2-tiny" in errors[0]["message"] and "--base is probably wrong" in errors[0]["message"]


def test_check_adapter_sees_kv_projections_that_ignore_grouped_query_attention(exported, tmp_path, config_only_base):
    def widen(tensors):  # an adapter made for 4 key/value heads, loaded on a base with 2
        return {k: torch.zeros(32, v.shape[1]) if re.search(r"\.(k|v)_proj\.lora_B", k) else v
                for k, v in tensors.items()}
    code, findings = _findings(_adapter(exported, tmp_path, "llama-all-linear", tensors=widen), config_only_base)
    mismatched = [f["message"] for f in findings if f["code"] == "shape.mismatch"]
    assert code == 1 and len(mismatched) == 4  # k_proj and v_proj of both layers
    assert all("shape (32, 4), peft expects (16, 4)" in m for m in mismatched), mismatched
