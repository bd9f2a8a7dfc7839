"""The architecture contracts of DESIGN.md, checked on the source: no module imports another module's private
name, `ops` imports nothing of the project but `ops`, and importing `ops` pulls in no data, checkpoint or
plotting library."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKED_DIRS = ("jaxmodels", "benchmarks", "experiments")
# Data, checkpoint, plotting, tracking and interop libraries: a user who imports a primitive pays only for JAX.
HEAVY_LIBRARIES = ("matplotlib", "orbax", "tensorflow_datasets", "grain", "array_record", "tensorboardX", "wandb",
                   "tqdm", "tokenizers", "sentencepiece", "safetensors", "transformers", "torch", "pyarrow",
                   "sklearn", "jaxmodels.data", "jaxmodels.train", "jaxmodels.interop")
BELOW_INTEROP = ("ops", "nn", "models", "tasks", "train", "parallel", "data")


def _module_name(path: pathlib.Path) -> str:
    """jaxmodels/ops/attention.py -> jaxmodels.ops.attention; a package's __init__.py -> the package."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _absolute(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """The absolute module of `from <level dots><module> import ...` written in module `importer`."""
    if not level:
        return module or ""
    base = importer.split(".")
    base = base[:len(base) - level + (1 if is_package else 0)]
    return ".".join(base + ([module] if module else []))


def private_name_violations(source: str, importer: str, *, is_package: bool = False, filename: str = "<source>"):
    """Lines of `source` (module `importer`) that use another jaxmodels module's private name:
    `from jaxmodels.x import _name` (aliased or not), `import jaxmodels.x._y`, or `alias._name` where alias is
    an imported jaxmodels module (or name). Returns a list of "filename:line: what" strings."""
    tree = ast.parse(source, filename)
    found, module_aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, importer, is_package)
            if not module.split(".")[0] == "jaxmodels" or module == importer:
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{filename}:{node.lineno}: imports {module}.{alias.name}")
                else:  # `from jaxmodels.ops import attention`: the alias names a module if it is one
                    module_aliases[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "jaxmodels":
                    continue
                if any(_is_private(part) for part in alias.name.split(".")):
                    found.append(f"{filename}:{node.lineno}: imports {alias.name}")
                module_aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in module_aliases and module_aliases[node.value.id] != importer):
            found.append(f"{filename}:{node.lineno}: uses {module_aliases[node.value.id]}.{node.attr}")
    return found


def project_imports(source: str, importer: str, *, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every jaxmodels module that `source` imports (the `from` module, and each imported
    name as a possible submodule)."""
    imports = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, importer, is_package)
            if module.split(".")[0] == "jaxmodels":
                imports.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            imports += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jaxmodels"]
    return imports


def _sources(*dirs):
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            yield path, path.read_text()


def test_no_module_uses_another_modules_private_name():
    violations = []
    for path, source in _sources(*CHECKED_DIRS):
        violations += private_name_violations(source, _module_name(path), is_package=path.name == "__init__.py",
                                              filename=str(path.relative_to(ROOT)))
    assert not violations, "private names used across modules:\n" + "\n".join(violations)


def test_ops_imports_only_ops():
    violations = []
    for path, source in _sources("jaxmodels/ops"):
        for line, module in project_imports(source, _module_name(path), is_package=path.name == "__init__.py"):
            if module != "jaxmodels.ops" and not module.startswith("jaxmodels.ops."):
                violations.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not violations, "ops must import nothing of the project but ops:\n" + "\n".join(violations)


def test_nothing_below_interop_imports_it():
    """jaxmodels.interop (Hugging Face import/export) sits above models and train: they must not need it."""
    violations = []
    for path, source in _sources(*(f"jaxmodels/{d}" for d in BELOW_INTEROP)):
        for line, module in project_imports(source, _module_name(path), is_package=path.name == "__init__.py"):
            if module == "jaxmodels.interop" or module.startswith("jaxmodels.interop."):
                violations.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    assert not violations, "interop may import models/nn/ops/train, not the other way round:\n" + "\n".join(violations)


def test_importing_ops_pulls_in_no_data_checkpoint_or_plotting_library():
    modules = [_module_name(path) for path, _ in _sources("jaxmodels/ops")]
    script = "\n".join([*(f"import {m}" for m in modules), "import sys",
                        f"print(sorted(m for m in {HEAVY_LIBRARIES!r} if m in sys.modules))"])
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"importing jaxmodels.ops imports {result.stdout.strip()}"


@pytest.mark.parametrize("source, expected", [
    ("from jaxmodels.ops.attention import _reference_attention\n", "imports jaxmodels.ops.attention._reference"),
    ("from jaxmodels.ops.checks import check_qkv as _check, _x as y\n", "imports jaxmodels.ops.checks._x"),
    ("from .layers import _zeros\n", "imports jaxmodels.nn.layers._zeros"),
    ("from jaxmodels.ops import scan\nscan._prepare(1)\n", "uses jaxmodels.ops.scan._prepare"),
    ("import jaxmodels.ops.moe as m\nm._check_k(1, 2)\n", "uses jaxmodels.ops.moe._check_k"),
    ("from jaxmodels.ops import moe as m\ny = m._check_k\n", "uses jaxmodels.ops.moe._check_k"),
])
def test_the_private_name_checker_catches_a_planted_violation(source, expected):
    found = private_name_violations(source, "jaxmodels.nn.planted", filename="planted.py")
    assert len(found) == 1 and found[0].startswith("planted.py:") and expected in found[0], found


@pytest.mark.parametrize("source", [
    "from jaxmodels.ops.checks import one_of\n",
    "import numpy as np\nnp._NoValue\n",                       # not a jaxmodels module
    "from jaxmodels.nn.planted import _own\n",                  # its own private name
    "from jaxmodels.ops import dispatch\ndispatch.__name__\n",  # dunder names are not private
])
def test_the_private_name_checker_passes_clean_code(source):
    assert private_name_violations(source, "jaxmodels.nn.planted") == []


def test_the_layering_checker_sees_project_imports():
    source = "from jaxmodels.nn import layers\nimport jaxmodels.ops.scan\nfrom . import checks\nimport numpy\n"
    assert project_imports(source, "jaxmodels.ops.planted") == [
        (1, "jaxmodels.nn"), (2, "jaxmodels.ops.scan"), (3, "jaxmodels.ops")]
