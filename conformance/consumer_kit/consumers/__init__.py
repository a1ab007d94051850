"""Consumers driven through the corpus: programs that load a peft adapter and apply it, run case by case.

A consumer is a module with `identity() -> dict` (name, version) and `compute(case) -> dict`, the logits it computes
for the case's input_ids under the names of the corpus ("unmerged", "merged", "disabled"); an output it tried and
could not compute maps to the exception. It raises NotApplicable(reason) for a case it cannot express. `run` writes
RESULTS/<case>/logits.safetensors (with errors.json for failed outputs; not_applicable.txt; error.txt when the
consumer crashed) and RESULTS/consumer.json, which `golden-check --corpus` reads; a crash on one case never stops
the others.
"""

import importlib
import json
import traceback
from pathlib import Path

from safetensors.torch import save_file

from ...zoo import models
from .. import corpus

CONSUMERS = {"reference": "conformance.consumer_kit.consumers.reference",
             "transformers": "conformance.consumer_kit.consumers.transformers_loader",
             "llama.cpp": "conformance.consumer_kit.consumers.llama_cpp",
             "diffusers": "conformance.consumer_kit.consumers.diffusers_loader"}


class NotApplicable(Exception):
    """The consumer cannot express this case (or this output); the message says why."""


def load(name: str):
    if name not in CONSUMERS:
        raise ValueError(f"consumer {name!r}: expected one of {', '.join(CONSUMERS)}")
    return importlib.import_module(CONSUMERS[name])


def run(name: str, corpus_dir: Path, results: Path, only: tuple[str, ...] = ()) -> dict[str, str]:
    """Every case (or those named in `only`) through consumer `name`; returns case -> "ok" | "n/a" | "error"."""
    consumer = load(name)
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    identity = consumer.identity()
    (results / "consumer.json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
    done = {}
    for case in corpus.read(corpus_dir):
        if only and case.name not in only:
            continue
        folder = results / case.name
        folder.mkdir(exist_ok=True)
        try:
            logits = consumer.compute(case)
        except NotApplicable as reason:
            (folder / "not_applicable.txt").write_text(f"{reason}\n")
            done[case.name] = "n/a"
            continue
        except Exception:  # the consumer's crash is its result for this case, reported by golden-check
            (folder / "error.txt").write_text(traceback.format_exc())
            done[case.name] = "error"
            continue
        failed = {k: f"{type(v).__name__}: {v}" for k, v in logits.items() if isinstance(v, BaseException)}
        if failed:
            (folder / "errors.json").write_text(json.dumps(failed, indent=2, sort_keys=True) + "\n")
        save_file({k: v.float().contiguous() for k, v in logits.items() if k not in failed},
                  folder / "logits.safetensors")
        done[case.name] = "ok" if not failed else f"failed: {', '.join(failed)}"
    return done


def language_models_only(case, consumer: str) -> None:
    """A consumer of language-model adapters refuses the corpus' diffusion cases, saying so."""
    if case.kind != "causal_lm":
        raise NotApplicable(f"{consumer} applies adapters to language models; this case is a {case.kind} pipeline "
                            f"with a {case.manifest.get('adapter_format', 'peft')} file")


def base_model(case):
    """The case's base model, loaded from its directory as transformers writes it."""
    return models.class_of_directory(case.base_dir).from_pretrained(case.base_dir).eval()
