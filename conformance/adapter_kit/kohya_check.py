"""check-adapter for a kohya-layout LoRA file against a diffusion base: every module found in the base by its
flattened path, its rank and scaling as the file defines them, the adapter computed by reference_impl and by peft
(they must agree), and, when diffusers is installed, what its load_lora_weights does with each module, measured
(conformance/adapter_kit/kohya.py; findings in docs/consumer-findings.md)."""

import copy
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..zoo import models
from . import kohya

PIPELINE = "sd-tiny"  # the zoo's pipeline: its UNet and text encoder (conformance/zoo/diffusion.py)
ZOO_COMPONENTS = {"unet": "sd-unet", "text_encoder": "clip-text"}


def diffusion_bases(spec: str) -> Optional[dict[str, torch.nn.Module]]:
    """The pipeline components a --base names: the zoo's (sd-tiny), or a folder holding unet/ (as diffusers writes
    it) and text_encoder/ (as transformers writes it), as a diffusers pipeline directory does; None otherwise."""
    if spec == PIPELINE:
        return {component: models.build(zoo) for component, zoo in ZOO_COMPONENTS.items()}
    folder = Path(spec)
    if not folder.is_dir() or not any((folder / c).is_dir() for c in kohya.COMPONENTS):
        return None
    bases = {}
    if (folder / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        bases["unet"] = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    for component in ("text_encoder", "text_encoder_2"):
        if (folder / component).is_dir():
            bases[component] = models.class_of_directory(folder / component).from_pretrained(folder / component).eval()
    return bases


def check(path: Path, bases: dict, report):
    file = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))), path)
    try:
        state = load_file(file)
        adapters = kohya.read(state, bases)
    except (ValueError, OSError) as error:
        report.add("error", "kohya.read", f"{file}: {error}")
        return report
    for component, (values, config) in adapters.items():
        patterns = {k: len(config.get(k, {})) for k in ("rank_pattern", "alpha_pattern")}
        report.add("info", "kohya.modules", f"{component}: {len(config['target_modules'])} modules, r {config['r']}, "
                   f"alpha {config['lora_alpha']:g} ({patterns['rank_pattern']} other ranks, "
                   f"{patterns['alpha_pattern']} other alphas); scaling alpha / r per module")
    _check_numbers(adapters, bases, report)
    _check_diffusers(state, bases, report)
    return report


def _check_numbers(adapters: dict, bases: dict, report) -> None:
    """The adapters the file holds, applied by reference_impl and by peft to their components: the same outputs."""
    import reference_impl

    try:
        import peft
    except ImportError:
        return
    for component, (values, config) in adapters.items():
        inputs = _inputs(component, bases[component])
        outputs = []
        for library in (reference_impl, peft):
            model = library.get_peft_model(copy.deepcopy(bases[component]), library.LoraConfig(**config))
            library.set_peft_model_state_dict(model, values)
            with torch.no_grad():
                outputs.append(models.output_tensor(model.eval()(**inputs)))
        if not torch.equal(*outputs):
            report.add("error", "numbers.peft", f"{component}: reference_impl and peft compute the file's adapter "
                       f"differently (max {(outputs[0] - outputs[1]).abs().max().item():.3g})")
        else:
            report.add("info", "numbers.peft", f"{component}: reference_impl and peft compute the file's adapter "
                       "identically")


def _inputs(component: str, base) -> dict:
    generator = torch.Generator().manual_seed(0)
    if component == "unet":
        config = base.config
        return {"sample": torch.randn(1, config.in_channels, 8, 8, generator=generator),
                "timestep": torch.tensor([10]),
                "encoder_hidden_states": torch.randn(1, 3, config.cross_attention_dim, generator=generator)}
    return {"input_ids": torch.randint(3, min(base.config.vocab_size, 99), (1, 5), generator=generator)}


def _check_diffusers(state: dict, bases: dict, report) -> None:
    """What diffusers' load_lora_weights does with each module, against what the file defines."""
    try:
        import diffusers
    except ImportError:
        report.add("info", "diffusers.absent", "diffusers is not installed: what its loader does was not measured")
        return
    from ..zoo import diffusion

    if "unet" not in bases or "text_encoder" not in bases:
        return
    pipeline = diffusion.pipeline(copy.deepcopy(bases["unet"]), copy.deepcopy(bases["text_encoder"]))
    try:
        loaded = kohya.loaded_by_diffusers(state, pipeline)
    except Exception as error:  # noqa: BLE001 - what diffusers refuses, said as such
        report.add("warning", "diffusers.refused", f"diffusers {diffusers.__version__}'s load_lora_weights refuses "
                   f"the file: {type(error).__name__}: {error}")
        return
    for component, wanted in kohya.expected_scalings(state, bases).items():
        got = loaded.get(component, {})
        dropped = sorted(set(wanted) - set(got))
        if dropped:
            report.add("warning", "diffusers.dropped", f"diffusers {diffusers.__version__} applies no LoRA to "
                       f"{len(dropped)} of the {len(wanted)} {component} modules the file adapts (for example "
                       f"{dropped[0]})")
        rescaled = sorted(p for p in set(wanted) & set(got) if abs(got[p][1] - wanted[p][1]) > 1e-6)
        for path in rescaled[:5]:
            report.add("warning", "diffusers.scaling", f"diffusers {diffusers.__version__} applies {component}."
                       f"{path} with scaling {got[path][1]:g}; the file says {wanted[path][1]:g} (alpha / r)")
        if len(rescaled) > 5:
            report.add("warning", "diffusers.scaling", f"... and {len(rescaled) - 5} more {component} modules")
        if not dropped and not rescaled:
            report.add("info", "diffusers.same", f"diffusers {diffusers.__version__} applies every {component} module "
                       "with the file's rank and scaling")
