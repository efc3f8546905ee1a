"""The layering the code relies on: harness/ never imports engines/, and every registered backend loads."""
import ast
import dataclasses
from pathlib import Path

import pytest

from harness.backends import (BACKENDS, ENGINE_BUILDERS, GRAPH_RUNNER, HOLDS, LABELLED_OPTIONS, QUANTIZED_EXPORT, Backend,
                              BackendOptions, BackendSpec, backend_class, load)
from harness.case import PRECISIONS, Case, Layout
from harness.errors import BackendUnavailable, HarnessError
from harness.kernels import KERNELS
from harness.shapes import parse_shape

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
    cls = backend_class(name)
    backend = cls()
    assert backend.name == name and backend.precisions and callable(backend.build)
    assert isinstance(backend.shards_sequence, bool)
    ok, reason = backend.available()
    assert isinstance(ok, bool) and (ok or reason), "an unavailable backend must say why"


@pytest.mark.parametrize("name", BACKENDS)
def test_an_engine_class_runs_what_its_spec_declares_and_declares_none_of_it(name):
    """The spec is the one place a backend's data lives: its engine class neither repeats it nor overrides the
    shared build/available that enforce it, and refuses exactly what the spec rules out, before its own part runs
    (no component is passed: a refused case never reaches it)."""
    spec, cls = BACKENDS[name], backend_class(name)
    assert issubclass(cls, Backend) and cls.spec is spec
    owned = {f.name for f in dataclasses.fields(BackendSpec)} | {"held_bytes", "build", "available", "refusal"}
    for engine_class in cls.__mro__[:cls.__mro__.index(Backend)]:
        assert not owned & set(vars(engine_class)), f"{engine_class.__name__} declares {owned & set(vars(engine_class))}"
    assert set(spec.precisions) <= set(PRECISIONS) and set(spec.attention_kernels) <= set(KERNELS)
    assert set(spec.labelled_options) <= set(LABELLED_OPTIONS) and spec.holds in HOLDS

    shape, own = parse_shape("16x16x9"), spec.precisions[0]
    backend = cls()
    for precision in set(PRECISIONS) - set(spec.precisions):
        with pytest.raises(BackendUnavailable, match=rf"^{name} has no {precision} path \(it runs "):
            backend.build(None, Case("transformer", shape, precision))
    if "fp8" in spec.precisions:
        with pytest.raises(BackendUnavailable, match="^fp8 quantization covers the DiT experts only, not vae_decoder"):
            backend.build(None, Case("vae_decoder", shape, "fp8"))
    split = backend.refusal("transformer", own, Layout(ulysses=2))
    assert (split == "") == spec.shards_sequence, split
    for kernel in KERNELS:
        options = BackendOptions(attention=kernel)
        if kernel not in spec.attention_kernels:
            with pytest.raises(HarnessError, match=f"^{name} takes "):
                cls(options)
            continue
        chosen = cls(options)
        assert chosen.kernel == kernel
        ring = chosen.refusal("transformer", own, Layout(ring=2))
        assert ("log-sum-exp" in ring) == (kernel != "sdpa" and spec.shards_sequence), ring
        if kernel != "sdpa":  # a kernel of ours goes in the experts' blocks, and fp8 covers only them anyway
            assert "DiT experts" in chosen.refusal("vae_decoder", own, Layout())
    assert backend.kernel == next(iter(spec.attention_kernels), "")


def test_builders_the_graph_runner_and_the_quantized_export_load():
    for path in (*ENGINE_BUILDERS.values(), GRAPH_RUNNER, QUANTIZED_EXPORT):
        assert callable(load(path))
