"""The layering the code relies on: harness/ never imports engines/, and every registered backend loads."""
import ast
from pathlib import Path

import pytest

from harness.backends import BACKENDS, ENGINE_BUILDERS, GRAPH_RUNNER, QUANTIZED_EXPORT, load

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "harness").glob("*.py")), ids=lambda p: p.name)
def test_the_library_never_imports_a_backend(path):
    offending = sorted(m for m in imported_modules(path) if m == "engines" or m.startswith("engines."))
    assert not offending, f"{path.relative_to(ROOT)} imports {offending}: harness/ reaches backends only " \
                          "through the registry in harness/backends.py"


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from engines.tensorrt import TensorRT\n")
    assert "engines.tensorrt" in imported_modules(bad)


@pytest.mark.parametrize("name", BACKENDS)
def test_every_registered_backend_loads_and_keeps_the_contract(name):
    cls = load(BACKENDS[name])
    backend = cls()
    assert backend.name == name and backend.precisions and callable(backend.build)
    assert isinstance(backend.shards_sequence, bool)
    ok, reason = backend.available()
    assert isinstance(ok, bool) and (ok or reason), "an unavailable backend must say why"


def test_builders_the_graph_runner_and_the_quantized_export_load():
    for path in (*ENGINE_BUILDERS.values(), GRAPH_RUNNER, QUANTIZED_EXPORT):
        assert callable(load(path))
