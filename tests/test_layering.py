"""The import layering of the repository, written down once and checked by parsing every module's imports
(``ast``; nothing is imported, so this runs in well under a second).

Two rules:

1. **Between packages** (:data:`ALLOWED`): the library ``dynamicid_jax`` imports no app package; the apps build on
   the library and on each other only downwards (``data_pipelines`` ← ``train`` ← ``infer``). The SynthFace world
   (the demo's procedural faces, their models and evaluation, stage 0, the demo orchestration; :data:`WORLD`, the
   ``synthface`` package) is an app of its own: it may import everything, but nothing else imports it — the
   library and the generic apps reach it only through the public registries it fills (``register_backend``,
   ``register_suite``; found by ``dynamicid_jax.plugins``). And no file in the ``dynamicid_jax/`` folder imports an
   app package, whatever unit it belongs to.
2. **Inside the library** (:data:`LIBRARY_LAYERS`): a module imports only modules of its own layer or of lower
   layers, so the library's parts cannot form import cycles.

Imports inside functions count as much as module-level ones. Today's known exceptions are listed one by one in
:data:`KNOWN_VIOLATIONS`, each with the reason it exists and the change that removes it; the test fails on any
new violation *and* on an exception that no longer occurs (so the list only shrinks).
"""
from __future__ import annotations

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dynamicid_jax", "data_pipelines", "train", "infer", "synthface", "benchmarks", "tests")
APPS = ("data_pipelines", "train", "infer", "synthface")

#: The SynthFace world: the app package that holds everything that exists only for the embedded demo world.
WORLD = ("synthface",)

#: unit → the units it may import (its own unit always included).
ALLOWED = {
    "dynamicid_jax": set(),
    "data_pipelines": {"dynamicid_jax"},
    "train": {"dynamicid_jax", "data_pipelines"},
    "infer": {"dynamicid_jax", "data_pipelines", "train"},
    "world": {"dynamicid_jax", "data_pipelines", "train", "infer"},
    "benchmarks": {"dynamicid_jax", "data_pipelines", "train"},
    "tests": set(PACKAGES) | {"world"},
}

#: The library's layers, lowest first (module prefixes; the longest matching prefix decides).
LIBRARY_LAYERS = (
    # file formats and small utilities that know no model
    ("dynamicid_jax.errors", "dynamicid_jax.file_io", "dynamicid_jax.cli_args", "dynamicid_jax.plugins"),
    ("dynamicid_jax.weights.keymap", "dynamicid_jax.weights.builtin_configs",
     "dynamicid_jax.weights.single_file", "dynamicid_jax.weights.single_file_sdxl",
     "dynamicid_jax.weights.torch_pickle",
     "dynamicid_jax.tokenizer", "dynamicid_jax.schedulers", "dynamicid_jax.sharding"),
    # Stable Diffusion's modules (and their loaders)
    ("dynamicid_jax.models",),
    # the methods on top of the models, and face analysis
    ("dynamicid_jax.methods", "dynamicid_jax.faces"),
    # each method's weights formats: the importers of the official DynamicID checkpoints, DynamicID's weights folder
    # (which stores converted official parts) and Infinite-ID's; they build method params, so they sit above the
    # methods
    ("dynamicid_jax.methods.dynamicid_official", "dynamicid_jax.methods.dynamicid_weights",
     "dynamicid_jax.methods.infinite_id_weights"),
    ("dynamicid_jax.pipelines",),
    ("dynamicid_jax.eval",),
    ("dynamicid_jax",),  # the package's __init__: the public names
)

#: (importing module, imported module) pairs that break the rules today, each scheduled to go away. Empty since
#: the SynthFace world became the ``synthface`` app package (issue #16); keep it that way.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, module: str, root: pathlib.Path) -> set[str]:
    """Every absolute module name ``module`` imports (relative imports resolved; ``from a import b`` yields
    ``a.b`` when that is a module of the repository, else ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if _is_repo_module(candidate, root) else source)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _is_repo_module(name: str, root: pathlib.Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _longest_prefix(module: str, prefixes) -> str | None:
    matches = [p for p in prefixes if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def _unit(module: str) -> str:
    return "world" if _longest_prefix(module, WORLD) else module.split(".")[0]


def _layer(module: str) -> int:
    ranks = {prefix: rank for rank, layer in enumerate(LIBRARY_LAYERS) for prefix in layer}
    prefix = _longest_prefix(module, ranks)
    assert prefix is not None, f"{module} is in no library layer: add it to LIBRARY_LAYERS"
    return ranks[prefix]


@functools.lru_cache(maxsize=2)
def _graph(root: pathlib.Path = ROOT) -> dict[str, frozenset[str]]:
    """module → the repository modules it imports (read-only; parsed once per root)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = _module_name(path, root)
            graph[module] = frozenset(_imports(path, module, root) - {module})
    return graph


def _violations(root: pathlib.Path = ROOT) -> set[tuple[str, str]]:
    found = set()
    for module, imported in _graph(root).items():
        unit = _unit(module)
        for target in imported:
            target_unit = _unit(target)
            if module.split(".")[0] == "dynamicid_jax" and target.split(".")[0] in APPS:
                found.add((module, target))
            elif target_unit != unit and target_unit not in ALLOWED[unit]:
                found.add((module, target))
            elif unit == target_unit == "dynamicid_jax" and _layer(target) > _layer(module):
                found.add((module, target))
    return found


def test_the_scan_sees_the_repository():
    graph = _graph(ROOT)
    assert len(graph) > 100, len(graph)
    assert "dynamicid_jax.methods.saa" in graph["dynamicid_jax.pipelines.dynamicid"]
    assert "train.loop" in graph["train.stage1"]


def test_no_new_layering_violations():
    new = sorted(_violations() - KNOWN_VIOLATIONS)
    assert not new, ("imports that break the layering (see this file's docstring; move the code or import in the "
                     "allowed direction):\n" + "\n".join(f"  {a} imports {b}" for a, b in new))


def test_known_violations_still_exist():
    """An exception that no longer occurs must leave the list, so the list never hides a new one."""
    gone = sorted(KNOWN_VIOLATIONS - _violations())
    assert not gone, "remove from KNOWN_VIOLATIONS:\n" + "\n".join(f"  {a} → {b}" for a, b in gone)


def test_the_rules_catch_a_library_import_of_an_app(tmp_path):
    """The checker itself: a library module importing ``train`` (even inside a function) is a violation."""
    package = tmp_path / "dynamicid_jax"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "bad.py").write_text("def f():\n    from train import loop\n    return loop\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "__init__.py").write_text("")
    (tmp_path / "train" / "loop.py").write_text("")
    for name in PACKAGES:
        (tmp_path / name).mkdir(exist_ok=True)
    assert _violations(tmp_path) == {("dynamicid_jax.bad", "train.loop")}
