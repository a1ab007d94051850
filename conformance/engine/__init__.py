"""The test engine, which no driver author needs to read: draws (strategies, scope), the adapted models under test
(harness), assertions bound to requirements (run, verdict, checks), known failures (expectations) and the reports
(outcomes, report, terminal). The suite in conformance/suite/ works through run.py's `run` fixture."""
