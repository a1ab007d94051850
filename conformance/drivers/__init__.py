"""Drivers shipped with the suite: `reference` (reference_impl), `peft` (the oracle), `loralib`."""
