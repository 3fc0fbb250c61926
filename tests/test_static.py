"""Static checks over every module of the repository (no module is imported, so this runs in a few seconds).

An undefined name inside a function is invisible to import-time checks and surfaces only when that code path runs
— in the worst case at the end of a long run (a missing import in the evaluation lanes once failed ``make demo``
after its training stages). pyflakes finds such names by reading the source.
"""
from __future__ import annotations

import pathlib

from pyflakes import api as pyflakes_api
from pyflakes import messages as pyflakes_messages
from pyflakes.reporter import Reporter

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dynamicid_jax", "data_pipelines", "train", "infer", "synthface", "benchmarks", "tests")

#: the message kinds that mean "this code fails when it runs", not style
FATAL = (pyflakes_messages.UndefinedName, pyflakes_messages.UndefinedExport, pyflakes_messages.UndefinedLocal)


class _Collect(Reporter):
    def __init__(self):
        self.found: list[str] = []

    def unexpectedError(self, filename, msg):  # noqa: N802 (pyflakes' interface)
        self.found.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802
        self.found.append(f"{filename}:{lineno}: syntax error: {msg}")

    def flake(self, message):
        if isinstance(message, FATAL):
            self.found.append(str(message))


def test_no_undefined_names_in_any_module():
    """Every name a module uses (imports, ``__all__`` entries, locals) is defined: pyflakes reports no undefined
    name, undefined export or local used before assignment in any package of the repository."""
    reporter = _Collect()
    files = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    assert len(files) > 100, f"found only {len(files)} modules under {PACKAGES}"
    for path in files:
        pyflakes_api.checkPath(str(path), reporter)
    assert not reporter.found, "\n".join(reporter.found)
