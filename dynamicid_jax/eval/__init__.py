"""Evaluation (docs/method.md §9): metrics and scorers (:mod:`.metrics`), bootstrap intervals (:mod:`.bootstrap`),
the scores of a suite's images (:mod:`.scores`), running the methods over requests (:mod:`.runner`) and the suite
registry (:mod:`.suites`) through which a world plugs in its own suite (the SynthFace demo world's lives in the
``synthface`` app package)."""
from .suites import EvalSuite, available_suites, get_suite, register_suite

__all__ = ["EvalSuite", "available_suites", "get_suite", "register_suite"]
