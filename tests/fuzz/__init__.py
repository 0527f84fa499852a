"""Fuzzing: coverage-guided harnesses (atheris) and a process-level stateful fuzzer.

``python tests/fuzz/run.py`` runs them all, bounded (``FASTBACKEND_FUZZ_SECONDS`` per
harness, 30 by default); ``tests/run.sh`` calls it.  See ``run.py`` for the knobs.
"""
