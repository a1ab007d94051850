"""check-adapter for a diffusion LoRA file (the kohya layout, or diffusers' own) against a diffusion base: every
module found in the base, its rank and scaling as the file defines them, the adapter computed by reference_impl and
by peft (they must agree), and, when diffusers is installed, what its load_lora_weights does with each module,
measured (conformance/adapter_kit/kohya.py, diffusers_layout.py; findings in docs/consumer-findings.md)."""

import copy
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..zoo import models
from . import diffusers_layout, kohya

PIPELINE = "sd-tiny"  # the zoo's pipeline: its UNet and text encoder (conformance/zoo/diffusion.py)
ZOO_COMPONENTS = {"unet": "sd-unet", "text_encoder": "clip-text"}
CHECKED = "checked"  # the adapter name the file is loaded under


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


def check(path: Path, bases: dict, report, layout: str = "kohya"):
    """`layout`: "kohya" or "diffusers" (what adapter_kit/foreign.py told the file apart as)."""
    file = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))), path)
    try:
        state = load_file(file)
        if layout == "kohya":
            adapters = kohya.read(state, bases)
        else:
            with safe_open(file, "pt") as opened:
                metadata = opened.metadata()
            adapters = diffusers_layout.read(state, metadata, bases)
            if not diffusers_layout.has_alphas(metadata):
                report.add("warning", "alpha.missing", f"{file.name} has no {diffusers_layout.METADATA} metadata, so "
                           "it does not say alpha: diffusers (and this check) read alpha = r, scaling 1, for every "
                           "module; a file trained with another alpha lost it (save_lora_weights(..., "
                           "unet_lora_adapter_metadata=config) keeps it)")
    except (ValueError, OSError) as error:
        report.add("error", f"{layout}.read", f"{file}: {error}")
        return report
    for component, (values, config) in adapters.items():
        patterns = {k: len(config.get(k) or {}) for k in ("rank_pattern", "alpha_pattern")}
        count = len(kohya.adapted_paths(values))
        report.add("info", f"{layout}.modules", f"{component}: {count} modules, r {config.get('r', 8)}, alpha "
                   f"{config.get('lora_alpha', 8):g} ({patterns['rank_pattern']} other ranks, "
                   f"{patterns['alpha_pattern']} other alphas)" + (", rsLoRA" if config.get("use_rslora") else ""))
    _check_numbers(adapters, bases, report)
    _check_diffusers(file, adapters, bases, report)
    return report


def scalings(adapters: dict) -> dict[str, dict[str, tuple[int, float]]]:
    """Each adapted module's (rank, scaling) per component, as the adapters' configs define them."""
    return {component: {path: kohya.rank_and_scaling(path, config) for path in kohya.adapted_paths(values)}
            for component, (values, config) in adapters.items()}


def loaded_by_diffusers(file: Path, pipeline) -> dict[str, dict[str, tuple[int, float]]]:
    """What diffusers' `load_lora_weights` does with a LoRA file, measured: per component, each adapted module's
    path -> (rank, scaling) as the peft layers it creates hold them. `pipeline` is changed: pass a copy."""
    from peft.tuners.lora import LoraLayer

    pipeline.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=CHECKED)
    out = {}
    for component in kohya.COMPONENTS:
        model = getattr(pipeline, component, None)
        layers = {path: (layer.r[CHECKED], float(layer.scaling[CHECKED])) for path, layer in model.named_modules()
                  if isinstance(layer, LoraLayer) and CHECKED in layer.r} if model is not None else {}
        if layers:
            out[component] = layers
    return out


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


def _check_diffusers(file: Path, adapters: dict, bases: dict, report) -> None:
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
        loaded = loaded_by_diffusers(file, pipeline)
    except Exception as error:  # noqa: BLE001 - what diffusers refuses, said as such
        report.add("warning", "diffusers.refused", f"diffusers {diffusers.__version__}'s load_lora_weights refuses "
                   f"the file: {type(error).__name__}: {error}")
        return
    for component, wanted in scalings(adapters).items():
        got = loaded.get(component, {})
        dropped = sorted(set(wanted) - set(got))
        if dropped:
            report.add("warning", "diffusers.dropped", f"diffusers {diffusers.__version__} applies no LoRA to "
                       f"{len(dropped)} of the {len(wanted)} {component} modules the file adapts (for example "
                       f"{dropped[0]})")
        rescaled = sorted(p for p in set(wanted) & set(got) if abs(got[p][1] - wanted[p][1]) > 1e-6)
        for path in rescaled[:5]:
            report.add("warning", "diffusers.scaling", f"diffusers {diffusers.__version__} applies {component}."
                       f"{path} with scaling {got[path][1]:g}; the file says {wanted[path][1]:g}")
        if len(rescaled) > 5:
            report.add("warning", "diffusers.scaling", f"... and {len(rescaled) - 5} more {component} modules")
        if not dropped and not rescaled:
            report.add("info", "diffusers.same", f"diffusers {diffusers.__version__} applies every {component} module "
                       "with the file's rank and scaling")
