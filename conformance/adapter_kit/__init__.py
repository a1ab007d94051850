"""For owners of adapters and models: check-adapter (an adapter directory against a base; other tools' formats in
foreign) and the gate (goldens of your own model and adapters, recorded once and verified in CI)."""
