"""The package layout: imports run one way (geo -> model -> pipeline -> training), with no circle."""

import ast
import subprocess
import sys
from pathlib import Path

import solarmap

PACKAGE = Path(solarmap.__file__).parent
# Each part may import only parts of a lower or equal rank (equal: only itself).
RANKS = {"errors": 0, "faults": 0, "geo": 1, "evaluate": 2, "model": 3, "pipeline": 4, "training": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """solarmap modules ``path`` imports anywhere (functions included), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for guard in ast.walk(tree)
               if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test)
               for node in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("solarmap"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("solarmap")}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules and name != "solarmap"}


def part(module: str) -> str:
    return module.split(".")[1]


GRAPH = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py") if module_name(p) != "solarmap"}


def test_every_module_belongs_to_a_ranked_part():
    assert {part(m) for m in GRAPH} <= set(RANKS)


def test_no_part_imports_a_part_above_it():
    upward = [(m, i) for m, deps in GRAPH.items() for i in deps
              if RANKS[part(i)] > RANKS[part(m)] or (RANKS[part(i)] == RANKS[part(m)] and part(i) != part(m))]
    assert upward == []


def test_no_import_circle():
    state: dict[str, int] = {}

    def visit(module, path):
        state[module] = 1
        for dep in GRAPH.get(module, ()):
            assert state.get(dep) != 1, " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_geo_needs_no_torch_and_the_pipeline_no_training():
    code = ("import sys, importlib, pkgutil, solarmap.geo\n"
            "for m in pkgutil.iter_modules(solarmap.geo.__path__): importlib.import_module('solarmap.geo.' + m.name)\n"
            "import solarmap.evaluate\n"
            "assert 'torch' not in sys.modules, 'geo imported torch'\n"
            "import solarmap.pipeline, solarmap.pipeline.regional, solarmap.model.scorer, solarmap.cli\n"
            "assert not [m for m in sys.modules if m.startswith('solarmap.training')], 'training imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_conda_environment_installs_what_pip_installs():
    """environment.yml lists every dependency and test extra of pyproject.toml (conda-forge or its pip
    section), so a conda user's suite does not skip tests for want of a package; every import of a
    third-party package in solarmap/ is declared."""
    import re
    import tomllib

    root = PACKAGE.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    listed = {name(line.strip().lstrip("- ")) for line in (root / "environment.yml").read_text().splitlines()
              if line.strip().startswith("- ") and not line.strip().startswith(("- -", "- pip:"))}
    # torch, torchvision and the ImageNet-weight wheels come through its pip section (-e .[test])
    assert {name(r) for r in wanted if not name(r).startswith("efficientnet")} - {"torch", "torchvision"} <= listed
    declared = {name(r) for r in wanted} | {name(r) for extra in project["optional-dependencies"].values() for r in extra}
    import_names = {"PIL": "pillow", "skimage": "scikit-image", "segmentation_models_pytorch": "segmentation-models-pytorch",
                    "yaml": "pyyaml", "sklearn": "scikit-learn"}
    imported = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "solarmap"}
    assert {import_names.get(m, m).lower().replace("_", "-") for m in third_party} - declared == set()
