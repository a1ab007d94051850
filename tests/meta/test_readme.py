"""The README's example runs as written and prints the figures it states."""

import contextlib
import io
import os
import re

from tests.conftest import ROOT


def test_readme_ia3_example():
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## IA3, LoHa and LoKr.*?```python\n(.*?)```", readme, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    stated = re.search(r"# (trainable params: .*)", code).group(1)
    assert printed.getvalue().strip() == stated == \
        "trainable params: 64,512 || all params: 124,504,320 || trainable%: 0.0518"


def test_readme_example(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## LoRA on GPT-2.*?```python\n(.*?)```", readme, re.S).group(1)
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert printed.getvalue().strip() == \
        "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"
    assert (tmp_path / "gpt2-lora" / "adapter_model.safetensors").stat().st_size == 1_182_680
    assert "| `[\"c_attn\"]` | 294,912 | 124,734,720 | 0.2364 | 1,182,680 bytes |" in readme


def test_readme_qlora_example_prints_what_peft_prints():
    """The QLoRA example quantizes a small Llama with bitsandbytes; reference_impl and peft print the stated line."""
    import pytest

    pytest.importorskip("bitsandbytes")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## QLoRA.*?```python\n(.*?)```", readme, re.S).group(1)
    stated = re.search(r"# (trainable params: .*)", code).group(1)
    as_peft = {"from reference_impl import": "from peft import",
               "from reference_impl.quantized import prepare_for_kbit_training":
                   "from peft import prepare_model_for_kbit_training as prepare_for_kbit_training"}
    assert all(line in code for line in as_peft)
    for library in ("reference_impl", "peft"):
        printed, source = io.StringIO(), code
        for ours, theirs in as_peft.items() if library == "peft" else ():
            source = source.replace(ours, theirs)
        with contextlib.redirect_stdout(printed):
            exec(compile(source, "README.md", "exec"), {})
        assert printed.getvalue().strip() == stated == \
            "trainable params: 139,264 || all params: 1,963,264 || trainable%: 7.0935", library


def test_readme_diffusion_example_writes_a_kohya_file_peft_s_adapter_reads_back(tmp_path):
    """The diffusion example as written: the line it states (peft prints the same for that config), and the kohya
    file it writes reads back, against the same UNet, as the adapter it was written from."""
    import pytest

    pytest.importorskip("diffusers")
    import torch
    from safetensors.torch import load_file

    from conformance.adapter_kit import kohya
    from conformance.zoo import diffusion

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## Diffusion LoRA.*?```python\n(.*?)```", readme, re.S).group(1)
    printed, scope, cwd = io.StringIO(), {}, os.getcwd()
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    stated = re.search(r"# (trainable params: [^(]*?)\s+\(peft", code).group(1)
    assert printed.getvalue().strip() == stated
    values, config = kohya.read(load_file(tmp_path / "lora.safetensors"), {"unet": diffusion.sd_unet()})["unet"]
    written = scope["get_peft_model_state_dict"](scope["unet"])
    assert values.keys() == written.keys() and all(torch.equal(values[k], written[k]) for k in values)
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    peft = pytest.importorskip("peft")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        peft.get_peft_model(diffusion.sd_unet(), peft.LoraConfig(**scope["config"])).print_trainable_parameters()
    assert printed.getvalue().strip() == stated
