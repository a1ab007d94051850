"""Broken drivers for KEYS, SER, LOAD, MTS and ERR: adapter tensors named, written and read the way other
libraries get it wrong."""

import copy
import json
import shutil

import torch
from safetensors.torch import load_file

from conformance.engine.harness import PREFIX
from tests.mutants.base import Mutant, adapter_dir, edit_files, edited_copy, named, renamed, round_to_bf16



class KeysKeepAdapterName(Mutant):
    """Keys keep '.default.' (lora_A.default.weight), as consumers of peft <= 0.3 sometimes expect."""

    kills, test = ("LORA-KEYS-001",), "test_keys::test_keys_match_peft"

    def adapter_state_dict(self, model, adapter_name="default"):
        return named(super().adapter_state_dict(model, adapter_name), adapter_name)

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, renamed(state_dict, f".{adapter_name}.", "."), adapter_name)


class EmbeddingKeysWithWeight(Mutant):
    """Embedding adapters are keyed 'lora_embedding_A.weight', like the Linear ones."""

    kills, test = ("LORA-KEYS-002",), "test_keys::test_embedding_keys_have_no_weight_suffix"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {k + ".weight" if "lora_embedding_" in k else k: v
                for k, v in super().adapter_state_dict(model, adapter_name).items()}

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, {k.removesuffix(".weight") if "lora_embedding_" in k else k: v
                                                for k, v in state_dict.items()}, adapter_name)


class MagnitudeAsColumn(Mutant):
    """DoRA's magnitude is exchanged as an (out, 1) column, the shape that broadcasts in the forward pass."""

    kills, test = ("LORA-KEYS-003",), "test_keys::test_shapes_and_dtypes_match_peft"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {k: v.view(-1, 1) if k.endswith("lora_magnitude_vector") and v.dim() == 1 else v
                for k, v in super().adapter_state_dict(model, adapter_name).items()}

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        live = super().adapter_state_dict(model, adapter_name)
        super().load_adapter_state_dict(model, {k: v.view(live[k].shape) if k in live else v
                                                for k, v in state_dict.items()}, adapter_name)


class MagnitudeKeyWithWeight(Mutant):
    """DoRA's magnitude is keyed 'lora_magnitude_vector.weight', as it was inside an nn.Module in peft <= 0.13."""

    kills, test = ("LORA-KEYS-005",), "test_keys::test_dora_magnitude_key"

    def adapter_state_dict(self, model, adapter_name="default"):
        return renamed(super().adapter_state_dict(model, adapter_name), "lora_magnitude_vector",
                       "lora_magnitude_vector.weight")

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, renamed(state_dict, "lora_magnitude_vector.weight",
                                                       "lora_magnitude_vector"), adapter_name)


class LoraOnlyBiasUnderItsOwnName(Mutant):
    """bias='lora_only' keys the adapted layer's bias '<layer>.bias', not '<layer>.base_layer.bias' (peft <= 0.20
    looked for that name and saved nothing)."""

    kills, test = ("LORA-KEYS-006",), "test_keys::test_bias_keys"

    def adapter_state_dict(self, model, adapter_name="default"):
        return renamed(super().adapter_state_dict(model, adapter_name), ".base_layer.bias", ".bias")

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        live = set(super().adapter_state_dict(model, adapter_name))
        fixed = {k[:-5] + ".base_layer.bias" if k.endswith(".bias") and k[:-5] + ".base_layer.bias" in live else k: v
                 for k, v in state_dict.items()}
        super().load_adapter_state_dict(model, fixed, adapter_name)


class ReadbackRoundedToHalf(Mutant):
    """Loaded values are stored in bf16 precision (a memory-saving loader) and read back rounded."""

    kills, test = ("LORA-KEYS-007",), "test_keys::test_loaded_values_read_back"

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, round_to_bf16(state_dict), adapter_name)


class StateDictCopies(Mutant):
    """adapter_state_dict() returns copies, so nothing the caller holds ever gets a gradient."""

    kills, test = ("LORA-KEYS-008",), "test_keys::test_adapter_state_dict_is_live"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {k: v.detach().clone().requires_grad_(v.requires_grad)
                for k, v in super().adapter_state_dict(model, adapter_name).items()}


class SafetensorsWithoutMetadata(Mutant):
    """adapter_model.safetensors is written without the {'format': 'pt'} metadata."""

    kills, test = ("LORA-SER-001",), "test_ser::test_saved_files_hold_the_live_tensors"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=lambda t: t, adapter_name=adapter_name, metadata={})


class SavesHalfTensors(Mutant):
    """Tensors are saved in float16 to halve the file."""

    kills, test = ("LORA-SER-002",), "test_ser::test_saved_files_hold_the_live_tensors"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=lambda t: {k: v.half() for k, v in t.items()}, adapter_name=adapter_name)


class WritesScaleAsAlpha(Mutant):
    """adapter_config.json gets the scale alpha / r where lora_alpha belongs (mlx-style)."""

    kills, test = ("LORA-SER-003",), "test_ser::test_saved_config_matches_peft"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, config=lambda c: {**c, "lora_alpha": c["lora_alpha"] / c["r"]}, adapter_name=adapter_name)


class SavesBrokenFilesByModel(Mutant):
    """Two bugs behind one door: GPT-2 adapters are saved without the safetensors metadata, the others in float16.
    The suite must charge each to its own requirement, with its own example."""

    kills, test = ("LORA-SER-001", "LORA-SER-002"), "test_ser::test_saved_files_hold_the_live_tensors"
    options = ("--peft-profile=ci",)  # several distinct failures in one test are found while shrinking

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        if type(model.get_base_model()).__name__.startswith("GPT2"):
            edit_files(directory, tensors=lambda t: t, adapter_name=adapter_name, metadata={})
        else:
            edit_files(directory, tensors=lambda t: {k: v.half() for k, v in t.items()}, adapter_name=adapter_name)


class NamedAdapterInRoot(Mutant):
    """An adapter not named 'default' is saved in the directory itself, not in its subfolder."""

    kills, test = ("LORA-SER-004",), "test_ser::test_other_adapter_goes_to_a_subfolder"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        if adapter_name != "default":
            for path in adapter_dir(directory, adapter_name).iterdir():
                shutil.move(str(path), str(adapter_dir(directory) / path.name))
            adapter_dir(directory, adapter_name).rmdir()


class LoadTakesAlphaEqualToR(Mutant):
    """Loading ignores lora_alpha and takes alpha = r (what a loader that reads only the tensors assumes)."""

    kills, test = ("LORA-LOAD-001",), "test_load::test_round_trip"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        copy_dir = edited_copy(directory, config=lambda c: {**c, "lora_alpha": c.get("r", 8),
                                                            "alpha_pattern": dict(c.get("rank_pattern") or {})})
        return super().load(base_model, copy_dir, adapter_name, is_trainable)


class SavesAndReadsBTransposed(Mutant):
    """Its files hold lora_B transposed (r, out): its own loader undoes that, peft cannot."""

    kills, test = ("LORA-LOAD-002",), "test_load::test_peft_loads_the_implementation_s_directory"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=_transpose_b, adapter_name=adapter_name)

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        return super().load(base_model, edited_copy(directory, tensors=_transpose_b), adapter_name, is_trainable)


def _transpose_b(tensors: dict) -> dict:
    return {k: v.T.contiguous() if k.endswith("lora_B.weight") else v for k, v in tensors.items()}


class ReadsKeysWithoutPrefix(Mutant):
    """Its files hold keys without peft's PREFIX; its loader adds the prefix back, so peft's keys come out
    doubled and match nothing (missing keys, a warning, an adapter that does nothing)."""

    kills, test = ("LORA-LOAD-003",), "test_load::test_implementation_loads_peft_s_directory"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, tensors=lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()},
                   adapter_name=adapter_name)

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        copy_dir = edited_copy(directory, tensors=lambda t: {PREFIX + k: v for k, v in t.items()})
        return super().load(base_model, copy_dir, adapter_name, is_trainable)


class LoadedAdapterTrainable(Mutant):
    """A loaded adapter trains whatever is_trainable says."""

    kills, test = ("LORA-LOAD-004",), "test_load::test_loaded_adapter_is_frozen_unless_trainable"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        return super().load(base_model, directory, adapter_name, is_trainable=True)


class LoadNeedsEveryConfigKey(Mutant):
    """The loader reads config['lora_dropout'] and friends directly: a minimal adapter_config.json is a KeyError."""

    kills, test = ("LORA-LOAD-006",), "test_load::test_minimal_config_takes_defaults"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        config = json.loads((adapter_dir(directory) / "adapter_config.json").read_text())
        config["lora_dropout"], config["bias"]  # noqa: B018 - the bug: fields peft treats as optional
        return super().load(base_model, directory, adapter_name, is_trainable)


class SavedModulesNeedADotBoundary(Mutant):
    """modules_to_save entries match like target names (name or '.' + entry): 'proj' no longer wraps 'c_proj'."""

    kills, test = ("LORA-MTS-001",), "test_mts::test_names_match_without_a_dot_boundary"

    def wrap(self, model, config, adapter_name="default"):
        names = config.get("modules_to_save")
        if names:
            full = [n for n, _ in model.named_modules() if n and any(n == e or n.endswith("." + e) for e in names)]
            config = {**config, "modules_to_save": full or None}
        return super().wrap(model, config, adapter_name)


class SavedModulesKeyedWithInfix(Mutant):
    """modules_to_save copies are keyed '<path>.modules_to_save.default.weight', the wrapper's internal name."""

    kills, test = ("LORA-MTS-002",), "test_match::test_modules_to_save_are_not_adapted"

    def adapter_state_dict(self, model, adapter_name="default"):
        return {_with_infix(k, adapter_name): v for k, v in super().adapter_state_dict(model, adapter_name).items()}

    def load_adapter_state_dict(self, model, state_dict, adapter_name="default"):
        super().load_adapter_state_dict(model, renamed(state_dict, f".modules_to_save.{adapter_name}.", "."),
                                        adapter_name)


def _with_infix(key: str, adapter_name: str) -> str:
    if ".lora_" in key or key.endswith("base_layer.bias"):
        return key
    path, _, leaf = key.rpartition(".")
    return f"{path}.modules_to_save.{adapter_name}.{leaf}"


class LoadsInHalfPrecision(Mutant):
    """The loader stores adapter tensors in bf16 precision."""

    kills, test = ("LORA-GOLD-002",), "test_gold::test_loaded_tensors_are_peft_s"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        return super().load(base_model, edited_copy(directory, tensors=round_to_bf16), adapter_name, is_trainable)


class ResaveDropsPatterns(Mutant):
    """adapter_config.json leaves rank_pattern and alpha_pattern out."""

    kills, test = ("LORA-GOLD-006",), "test_gold::test_saving_again_writes_peft_s_files"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        edit_files(directory, config=lambda c: {k: v for k, v in c.items() if k not in ("rank_pattern",
                                                                                          "alpha_pattern")},
                   adapter_name=adapter_name)


class LoadsTruncatedFileLeniently(Mutant):
    """A weights file that cannot be read gives a model with a fresh adapter, and no error."""

    kills, test = ("LORA-ERR-011",), "test_err::test_truncated_file_is_refused"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        try:
            load_file(adapter_dir(directory) / "adapter_model.safetensors")
        except Exception:
            config = json.loads((adapter_dir(directory) / "adapter_config.json").read_text())
            return self.wrap(base_model, {k: v for k, v in config.items() if k in ("r", "lora_alpha",
                                                                                   "target_modules")})
        return super().load(base_model, directory, adapter_name, is_trainable)


class LoadsWhatFits(Mutant):
    """A tensor of the wrong shape is cut or zero-padded to fit, and no error."""

    kills, test = ("LORA-ERR-012",), "test_err::test_wrong_shape_is_refused"

    def load(self, base_model, directory, adapter_name="default", is_trainable=False):
        config = json.loads((adapter_dir(directory) / "adapter_config.json").read_text())
        fresh = self.wrap(copy.deepcopy(base_model), {k: config[k] for k in ("r", "lora_alpha", "target_modules")})
        shapes = {k: v.shape for k, v in self.adapter_state_dict(fresh).items()}
        fitted = edited_copy(directory, tensors=lambda t: {k: _fit(v, shapes[k]) if k in shapes else v
                                                           for k, v in t.items()})
        return super().load(base_model, fitted, adapter_name, is_trainable)


def _fit(tensor: torch.Tensor, shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=tensor.dtype)
    region = tuple(slice(0, min(a, b)) for a, b in zip(tensor.shape, shape))
    out[region] = tensor[region]
    return out
