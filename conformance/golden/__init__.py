"""Golden fixtures: what peft wrote and computed for tiny models of the zoo, frozen in versioned folders.

Stored packed (store.py): fixtures/FIXTURES.lock and fixtures/objects/<sha256>, each content once;
the tree below is what they hold, unpacked once into the user's cache (`root()`).

    fixtures/FIXTURES.lock                       sha256 of every fixture file, all versions
    fixtures/v1/base/{config.json, model.safetensors}   the tiny GPT-2 (v1 has no other base)
    fixtures/v2/bases/<zoo model>/{config.json, model.safetensors}   v2: Llama, BERT classifier, T5, LLaVA
    fixtures/v1/gpt2-counts.json                 full-size GPT-2 parameter counts, recorded from peft
    fixtures/v1/cases/<case>/adapter/...         the adapter directory peft wrote
    fixtures/v1/cases/<case>/{inputs,expected}.safetensors, manifest.json ("base": its zoo model, from v2 on)

Versions are append-only: `generate` writes a new version folder and never edits an old one.

Modules by job: store.py reads a fixtures folder and checks it against its lock; recipes.py says what each version
records; record.py records a new version with peft; diff.py says what changed between two versions. Results
computed in another process are checked by conformance/consumer_kit/consumer_check.py.
"""

from .diff import changes
from .recipes import CASE_SPECS, COUNT_CONFIGS, CaseSpec
from .record import generate, producers, record_version
from .store import (COMBINED, ENV_CACHE, ENV_ROOT, LOCK_NAME, OBJECTS, QUANTIZATION, RENAMED_PATHS, SECOND, Case,
                    aliases, base_model, cases, editable, fixture_files, in_this_transformers, is_packed, pack,
                    read_lock, root, sha256, source, unpacked, verify, versions)

__all__ = ["changes", "CASE_SPECS", "COUNT_CONFIGS", "CaseSpec", "generate", "producers", "record_version",
           "ENV_ROOT", "COMBINED", "LOCK_NAME", "RENAMED_PATHS", "SECOND", "in_this_transformers", "Case", "aliases",
           "base_model", "cases", "fixture_files", "read_lock", "root", "sha256", "verify", "versions", "ENV_CACHE",
           "OBJECTS", "editable", "is_packed", "pack", "source", "unpacked", "QUANTIZATION"]
