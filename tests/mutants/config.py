"""Broken drivers for CFG and MATCH: a config read or a target matched the way other libraries get it wrong."""

import json
import re

from conformance.engine import scope
from tests.mutants.base import Mutant, adapter_dir, edit_files


def _adaptable(model) -> list[str]:
    return [n for n, m in model.named_modules() if n and scope.layer_kind(m) is not None]


class DefaultAlphaTwiceRank(Mutant):
    """A config without lora_alpha gets 2 * r (a common training-script default), not peft's 8."""

    kills, test = ("LORA-CFG-001",), "test_ser::test_defaults"

    def edit_config(self, config):
        config.setdefault("lora_alpha", 2 * config.get("r", 8))
        return config


class RankClampedToOne(Mutant):
    """r <= 0 is silently raised to 1 instead of refused."""

    kills, test = ("LORA-CFG-002",), "test_cfg::test_invalid_values_are_rejected"

    def edit_config(self, config):
        if isinstance(config.get("r"), int) and config["r"] <= 0:
            config["r"] = 1
        return config


class SavesFanInFanOutAsGiven(Mutant):
    """adapter_config.json keeps the caller's fan_in_fan_out=False for GPT-2 Conv1D targets."""

    kills, test = ("LORA-CFG-004",), "test_ser::test_conv1d_targets_save_fan_in_fan_out"

    def wrap(self, model, config, adapter_name="default"):
        wrapped = super().wrap(model, config, adapter_name)
        wrapped.given_fan_in_fan_out = config.get("fan_in_fan_out", False)
        return wrapped

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        given = getattr(model, "given_fan_in_fan_out", False)
        edit_files(directory, config=lambda c: {**c, "fan_in_fan_out": given}, adapter_name=adapter_name)


class RegexSearchNotFullmatch(Mutant):
    """A str target_modules is searched for anywhere in a name (re.search), not matched against all of it."""

    kills, test = ("LORA-MATCH-001",), "test_match::test_regex_targets_and_exclusions"

    def wrap(self, model, config, adapter_name="default"):
        targets = config.get("target_modules")
        if isinstance(targets, str) and targets != "all-linear":
            found = [n for n in _adaptable(model) if re.search(targets, n)]
            config = {**config, "target_modules": found or targets}
        return super().wrap(model, config, adapter_name)


class PlainSuffixMatch(Mutant):
    """A list entry matches any name that ends with it, with no dot boundary: "_attn" adapts "c_attn"."""

    kills, test = ("LORA-MATCH-002",), "test_match::test_list_entries_match_names_and_dotted_suffixes"

    def wrap(self, model, config, adapter_name="default"):
        targets = config.get("target_modules")
        if isinstance(targets, list):
            found = [n for n in _adaptable(model) if any(n.endswith(t) for t in targets)]
            config = {**config, "target_modules": found or targets}
        return super().wrap(model, config, adapter_name)


class ExcludeIgnored(Mutant):
    """exclude_modules is read and dropped."""

    kills, test = ("LORA-MATCH-003",), "test_match::test_regex_targets_and_exclusions"

    def edit_config(self, config):
        config.pop("exclude_modules", None)
        return config


class AllLinearTakesTheHead(Mutant):
    """"all-linear" also adapts the LM head (the output embedding)."""

    kills, test = ("LORA-MATCH-004",), "test_match::test_all_linear"

    def wrap(self, model, config, adapter_name="default"):
        if config.get("target_modules") == "all-linear":
            linear = [n for n, m in model.named_modules() if scope.layer_kind(m) in ("linear", "conv1d")]
            config = {**config, "target_modules": linear}
        return super().wrap(model, config, adapter_name)


class LayersIgnored(Mutant):
    """layers_to_transform and layers_pattern are read and dropped: every layer is adapted."""

    kills, test = ("LORA-MATCH-005",), "test_match::test_layers_to_transform"

    def edit_config(self, config):
        config.pop("layers_to_transform", None)
        config.pop("layers_pattern", None)
        return config


class NothingTargetedIsSilent(Mutant):
    """A config that matches no module gives back the model without an adapter, and no error."""

    kills, test = ("LORA-MATCH-006",), "test_match::test_nothing_targeted_is_an_error"

    def wrap(self, model, config, adapter_name="default"):
        try:
            return super().wrap(model, config, adapter_name)
        except ValueError as error:
            if "not found" in str(error) or "No modules were targeted" in str(error):
                return model
            raise


class UnsupportedTypesSkipped(Mutant):
    """Targeting a LayerNorm or a whole block is skipped silently instead of refused."""

    kills, test = ("LORA-MATCH-007",), "test_match::test_unsupported_module_type_is_an_error"

    def wrap(self, model, config, adapter_name="default"):
        try:
            return super().wrap(model, config, adapter_name)
        except ValueError as error:
            if "is not supported" in str(error):
                return model
            raise


class PatternKeysMatchFullNamesOnly(Mutant):
    """rank_pattern / alpha_pattern keys must equal a module's full name; a dotted suffix does not match."""

    kills, test = ("LORA-MATCH-009",), "test_match::test_rank_pattern_keys_are_suffix_regexes"

    def edit_config(self, config):
        for field in ("rank_pattern", "alpha_pattern"):
            if config.get(field):
                config[field] = {f"^(?:{key})$": value for key, value in config[field].items()}
        return config


class SavedModulesAlsoAdapted(Mutant):
    """modules_to_save is applied as an afterthought: a module both targeted and saved gets a LoRA adapter."""

    kills, test = ("LORA-MATCH-010",), "test_match::test_modules_to_save_are_not_adapted"

    def edit_config(self, config):
        config.pop("modules_to_save", None)
        return config


class LastPatternKeyWins(Mutant):
    """Of several rank_pattern / alpha_pattern keys that match a module, the last one wins."""

    kills, test = ("LORA-MATCH-012",), "test_match::test_first_matching_rank_key_wins"

    def edit_config(self, config):
        for field in ("rank_pattern", "alpha_pattern"):
            if config.get(field):
                config[field] = dict(reversed(list(config[field].items())))
        return config


class SavesPatternsSorted(Mutant):
    """adapter_config.json sorts rank_pattern / alpha_pattern keys (as peft 0.21 does), so the first matching
    key changes on reload."""

    kills, test = ("LORA-SER-006",), "test_ser::test_overlapping_pattern_keys_survive_a_round_trip"

    def save(self, model, directory, adapter_name="default"):
        super().save(model, directory, adapter_name)
        path = adapter_dir(directory, adapter_name) / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True))
