"""The package's layout holds: no import cycles, and pre-flight stays light (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dreambooth"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


# The layers of docs/design.md, bottom first: a module imports only from its own layer or the layers below it.
LAYERS = {
    "base": ["errors", "versions", "options", "command_options", "formats.atomic", "training.speed"],
    "what things are": ["config", "config_file", "models.base", "models.layout", "formats.lora", "formats.lycoris",
                        "formats.lora_fit", "training.images", "training.buckets", "training.captions",
                        "training.masks", "training.tokens", "training.rundir", "training.distributed", "training.loss",
                        "training.flow", "models.families"],
    "models and drawing": ["models.families.common", "models.families.sd", "models.families.sdxl",
                           "models.families.transformer", "models.families.flux", "models.families.sd3",
                           "models.loading", "formats.lycoris_loading", "formats.lora_loading",
                           "models.tiny", "models.tiny_flow", "models.tiny_families",
                           "generate"],
    "exports": ["formats.kohya", "formats.merge", "formats.single_file", "formats.flow_layout", "formats.flow_merge",
                "formats.flux_kohya", "formats.flow_single_file"],
    "characters": ["characters.state", "characters.character", "characters.compiler"],
    "training": ["training.data", "training.cache", "training.components", "training.ema", "training.checkpoint",
                 "training.outputs", "training.class_images", "training.hub", "preflight", "training.graph_step",
                 "training.offload", "training.validation_loss", "training.report", "training.report_page",
                 "training.loop"],
    "evaluation": ["evaluation.scorers", "evaluation.evaluate", "evaluation.world", "evaluation.world_model",
                   "evaluation.world_model_flux", "evaluation.experiment", "evaluation.demo", "evaluation.compare",
                   "evaluation.background"],
    "serving": ["serving.batcher", "serving.auth", "serving.cache", "serving.stores", "serving.metrics",
                "serving.service", "serving.renderer", "serving.chat", "serving.app", "serving.ray_app"],
    "studio": ["studio.runner", "studio.evaluating", "studio.runs"],
    "front doors": ["export", "project", "characters.commands", "serving.command", "studio.projects", "studio.trying",
                    "studio.shipping", "studio.app", "studio.command", "cli", "__main__"],
}


def type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of import nodes under `if TYPE_CHECKING:`, which never run."""
    return {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", None) == "TYPE_CHECKING" for inner in ast.walk(node)}


def imports_of(path: Path) -> set[str]:
    """The package's modules `path` imports, at the top or inside a function alike: a cycle through a function-level
    import is still a cycle in the design, only one that does not crash at start-up."""
    found = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dreambooth"):
            for alias in node.names:  # `from dreambooth.training import loop` imports a module
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dreambooth"))
    me = module_name(path)
    return {m for m in found if m in MODULES and m != me and m != "dreambooth"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_package_has_no_import_cycle():
    graph = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    assert graph["dreambooth.cli"], "the import graph is empty: the scan is broken"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def source_file(module: str) -> Path:
    """A module's file: `a/b.py`, or `a/b/__init__.py` for a package with code of its own."""
    path = PACKAGE.parent / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_every_import_goes_down_the_layers():
    layer = {f"dreambooth.{m}": i for i, modules in enumerate(LAYERS.values()) for m in modules}
    packages = {m for m in MODULES if (PACKAGE.parent / m.replace(".", "/") / "__init__.py").is_file()} - {
        f"dreambooth.{m}" for modules in LAYERS.values() for m in modules}
    assert sorted(set(MODULES) - packages - set(layer)) == [], "modules missing from LAYERS (and docs/design.md)"
    upward = [f"{m} -> {dep}" for m in sorted(layer) for dep in sorted(imports_of(source_file(m)))
              if dep in layer and layer[dep] > layer[m]]
    assert upward == [], "imports from a higher layer: " + "; ".join(upward)


# Each module imported first, with none of the package loaded before it. One interpreter for all (a fresh one per
# module cost 70 s of the suite, mostly torch loading again): the package's modules are dropped from sys.modules before
# each import, the libraries stay loaded, which cannot hide an order-dependent import of our own.
IMPORT_EACH_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "dreambooth" or m.startswith("dreambooth.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-3))
print("\\n".join(failed))
"""


def test_every_module_imports_on_its_own():
    """First thing, with no other module of the package loaded: an order-dependent import (a cycle that only works one
    way) fails here."""
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *MODULES], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout[-4000:]


TORCH_AT_IMPORT = ("training.loss", "training.flow")
LIGHT = [f"dreambooth.{m}" for layer in ("base", "what things are") for m in LAYERS[layer] if m not in TORCH_AT_IMPORT]


@pytest.mark.parametrize("module", [*LIGHT, "dreambooth.preflight", "dreambooth.cli"])
def test_light_modules_do_not_import_torch(module):
    """Pre-flight checks everything it can before anything heavy loads; `--help` and config errors answer at once."""
    heavy = "('torch', 'diffusers', 'transformers', 'peft')"
    code = f"import sys, {module}; print(sorted(m for m in {heavy} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]", f"{module} imports {proc.stdout.strip()}"
