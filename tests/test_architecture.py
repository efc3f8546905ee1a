"""The layering the code relies on: harness/ never imports engines/, no two modules import each other (through any
chain), the report judges nothing, thresholds.toml has one reader, and every registered backend loads."""
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
    """Every module a file imports, at any depth of the file (function-level imports count too); `from a import b`
    names both a and a.b, since b may be a module of package a."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_files(root: Path) -> dict[str, Path]:
    """The modules of harness/ and engines/ (packages included) by dotted name, e.g. engines.attention.fa3."""
    files = [*(root / "harness").rglob("*.py"), *(root / "engines").rglob("*.py")]
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Each module of harness/ and engines/ -> the modules of those packages it imports.

    Imports inside functions count as well: run lazily they cannot break loading, but they tie two modules together
    as much as a top-level import does (the store once reached the regression judge through one, inside the summary).
    """
    modules = module_files(root)
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One chain of imports that returns to where it started ([a, b, a]), or [] when there is none (depth first)."""
    done: set[str] = set()

    def walk(name: str, chain: list[str]) -> list[str]:
        if name in chain:
            return chain[chain.index(name):] + [name]
        if name in done:
            return []
        for imported in sorted(graph[name]):
            cycle = walk(imported, chain + [name])
            if cycle:
                return cycle
        done.add(name)
        return []

    return next(filter(None, (walk(name, []) for name in sorted(graph))), [])


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(import_graph(ROOT))
    assert not cycle, f"import cycle: {' -> '.join(cycle)}; move what both need below them (one concept, one module)"


def test_the_cycle_walk_finds_a_cycle_through_a_lazy_import(tmp_path):
    (tmp_path / "harness").mkdir()
    (tmp_path / "engines" / "attention").mkdir(parents=True)
    (tmp_path / "harness" / "results.py").write_text("def summary():\n    from harness.regression import load_rules\n")
    (tmp_path / "harness" / "regression.py").write_text("from engines.attention import fa3\n")
    (tmp_path / "engines" / "attention" / "__init__.py").write_text("")
    (tmp_path / "engines" / "attention" / "fa3.py").write_text("from harness import results\n")
    graph = import_graph(tmp_path)
    assert graph["harness.regression"] == {"engines.attention", "engines.attention.fa3"}
    assert find_cycle(graph) == ["engines.attention.fa3", "harness.results", "harness.regression",
                                 "engines.attention.fa3"]
    (tmp_path / "engines" / "attention" / "fa3.py").write_text("import harness.errors\n")
    assert find_cycle(import_graph(tmp_path)) == []


def test_the_report_judges_nothing():
    """summary.md and `harness summary` print the verdicts the rows carry: the report reaches no judge (and no
    threshold), so it cannot decide a verdict again."""
    judges = {"harness.compare", "harness.timing", "harness.regression", "harness.thresholds"}
    reached = imported_modules(ROOT / "harness" / "report.py") & judges
    assert not reached, f"harness/report.py imports {sorted(reached)}"


def test_thresholds_toml_has_one_reader():
    readers = [p.relative_to(ROOT).as_posix() for folder in ("harness", "engines", "cases", "tests")
               for p in sorted((ROOT / folder).rglob("*.py")) if "tomllib" in imported_modules(p)]
    assert readers == ["harness/thresholds.py"], readers


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
