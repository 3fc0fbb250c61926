"""The repository's documentation holds together: code cites only documents that are in the repository, every
``docs/<name>.md §N`` citation names a section that exists, and every relative link in README.md and docs/
points at a file that exists. Reads files only (no imports of the packages): well under a second."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a clone contains that we wrote (build outputs, caches and the virtualenv are not ours to check).
SCANNED_DIRS = ("dynamicid_jax", "train", "infer", "data_pipelines", "synthface", "tests", "benchmarks", "docs")
SCANNED_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt"}
# The method specification lived outside the repository; its name is split so this file does not match itself.
MISSING_SPEC = re.compile("SP" + r"EC(\.md)?\s*§")
CITATION = re.compile(r"docs/([\w-]+\.md)\s+(§\s*\d+(?:\.\d+)*(?:\s*(?:[–,-]|and)\s*§?\s*\d+(?:\.\d+)*)*)")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)[.\s]", re.M)
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _text_files() -> list[pathlib.Path]:
    files = [ROOT / name for name in ("README.md", "Makefile", "pyproject.toml") if (ROOT / name).is_file()]
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in SCANNED_SUFFIXES and "__pycache__" not in path.parts:
                files.append(path)
    return files


def _sections(doc: pathlib.Path) -> set[str]:
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def test_no_citation_of_a_document_outside_the_repository():
    hits = []
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in MISSING_SPEC.finditer(text):  # \s also spans a line break ("…SPEC\n§6")
            number = text.count("\n", 0, match.start()) + 1
            hits.append(f"{path.relative_to(ROOT)}:{number}: {text.splitlines()[number - 1].strip()[:100]}")
    assert not hits, "cite docs/method.md §N instead of the specification that is not in the repository:\n" + \
        "\n".join(hits)


def test_docs_citations_name_existing_sections():
    sections: dict[str, set[str]] = {}
    bad, count = [], 0
    for path in _text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)):
            doc = ROOT / "docs" / match.group(1)
            if not doc.is_file():
                bad.append(f"{path.relative_to(ROOT)}: docs/{match.group(1)} does not exist")
                continue
            known = sections.setdefault(doc.name, _sections(doc))
            for number in re.findall(r"\d+(?:\.\d+)*", match.group(2)):
                count += 1
                if number not in known:
                    bad.append(f"{path.relative_to(ROOT)}: docs/{doc.name} has no section {number}")
    assert count >= 40, f"only {count} docs/… § citations found; the scan is broken"
    assert not bad, "\n".join(bad)


def test_method_sections_are_numbered_without_gaps():
    top = sorted({int(n.split(".")[0]) for n in _sections(ROOT / "docs" / "method.md")})
    assert top == list(range(top[0], top[-1] + 1)) and top[0] == 0, top


@pytest.mark.parametrize("doc", ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")))
def test_relative_links_resolve(doc):
    path = ROOT / doc
    missing = []
    for target in MD_LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        if not (path.parent / target).exists():
            missing.append(target)
    assert not missing, f"{doc} links to missing files: {missing}"
