"""The package's layering (docs/architecture.md, "Layers"): every module imports only from its own layer or the
layers below it. The imports are read with `ast` from the source (top-level, inside functions and under
TYPE_CHECKING alike), so nothing is imported to check them. A failure names the module, the line and the layer
it reached up into: move the code down, or pass the object in from above."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vapo_megatron"

# Bottom to top. A module of layer i may import modules of layers 0..i. Keep docs/architecture.md in step.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"__init__", "errors", "process_guard", "platform", "timing"}),
    ("pure", {"algorithms", "data"}),
    ("parallel", {"parallel"}),
    ("config", {"config", "config_checks"}),
    ("models", {"models"}),
    ("convert", {"convert"}),
    ("engine", {"engine"}),
    ("rewards and rollout", {"rewards", "rollout", "values"}),
    ("analysis", {"report", "planning"}),
    ("testing", {"testing"}),
    ("orchestration", {"train", "ablation"}),
    ("entry points", {"cli"}),
]
LAYER_OF = {part: i for i, (_, parts) in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    """The top-level part of `vapo_megatron.<part>...` ("__init__" for the package itself)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts)] = \
            path
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported vapo_megatron module) for every import statement of the file, relative ones resolved."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                 else []))
            found += [(node.lineno, f"{base}.{a.name}" if base == "vapo_megatron" else base) for a in node.names]
    return [(line, name) for line, name in found if name == "vapo_megatron" or name.startswith("vapo_megatron.")]


def layering_violations() -> list[str]:
    problems = []
    for module, path in _modules().items():
        part = _part(module)
        if part not in LAYER_OF:
            problems.append(f"{module}: part {part!r} has no layer; add it to LAYERS and docs/architecture.md")
            continue
        for line, target in _imports(module, path):
            t_part = _part(target)
            if LAYER_OF.get(t_part, -1) > LAYER_OF[part]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} (layer "
                                f"{LAYERS[LAYER_OF[part]][0]!r}) imports {target} (layer "
                                f"{LAYERS[LAYER_OF[t_part]][0]!r}, above it)")
    return problems


def test_no_module_imports_a_layer_above_its_own():
    assert layering_violations() == []


def test_parallel_imports_none_of_convert_engine_rollout_trainer_testing():
    """Issue 14's acceptance, spelled out (it also follows from the layer order)."""
    banned = {"convert", "engine", "rollout", "train", "testing"}
    bad = [f"{m}:{line} imports {t}" for m, p in _modules().items() if _part(m) == "parallel"
           for line, t in _imports(m, p) if _part(t) in banned]
    assert bad == []


@pytest.mark.parametrize("module", ["vapo_megatron.algorithms", "vapo_megatron.config", "vapo_megatron.data.rl_batch"])
def test_pure_layers_import_without_megatron(module):
    """The math, the config and the batch type load on a machine without megatron-core (and without its shims)."""
    code = f"import sys, {module}; bad = [m for m in sys.modules if m.startswith('megatron')]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
