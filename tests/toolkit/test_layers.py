"""The layers of DESIGN.md point one way: conf -> app -> pipeline -> launcher -> worker -> recipe/model/data,
with the config layer below all of them. Checked on the source (every import statement, also those
inside functions), so a lazy import cannot hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import umm

PACKAGE = Path(umm.__file__).resolve().parent

# Subpackage (or top module) of umm -> what it must not import: umm layers above it, and Hydra
# where DESIGN.md says the layer knows nothing of it.
ABOVE_WORKER = {"umm.app", "umm.callbacks", "umm.pipelines", "umm.launch"}
FORBIDDEN = {
    "config": ABOVE_WORKER | {"umm.train", "umm.methods", "umm.model", "umm.data"},
    "pipelines": {"umm.app", "umm.callbacks"},
    "launch": {"umm.app", "umm.callbacks", "umm.pipelines", "umm.model"},
    "train": ABOVE_WORKER | {"hydra"},
    "methods": ABOVE_WORKER | {"hydra"},
    "model": ABOVE_WORKER | {"hydra"},
    "data": ABOVE_WORKER | {"hydra"},
}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; umm imports absolutely"
            yield node.lineno, node.module


def _inside(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for layer, forbidden in FORBIDDEN.items():
        files = sorted((PACKAGE / layer).rglob("*.py"))
        assert files, f"umm/{layer} has no modules"
        for path in files:
            for line, module in _imports(path):
                wrong += [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
                          for prefix in forbidden if _inside(module, prefix)]
    assert not wrong, "\n".join(wrong)


def test_the_registries_cover_the_names_the_config_layer_checks():
    """validate.py checks pipeline.name and method.recipe against umm/config/names.py; each registry
    must offer exactly those names, or a valid config would find no code (or a registered one be refused)."""
    from umm.config.names import PIPELINE_NAMES, RECIPE_NAMES
    from umm.methods import RECIPES
    from umm.pipelines import PIPELINES

    assert tuple(PIPELINES) == PIPELINE_NAMES
    assert tuple(RECIPES) == RECIPE_NAMES
    assert sorted(p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem in RECIPE_NAMES) == sorted(RECIPE_NAMES)
