"""The house rules that keep the code navigable (issue 12): no import cycles, one owner of the store layout."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "actstore"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> actstore modules it imports, at any level of the file (function bodies and TYPE_CHECKING too)."""
    mods = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[mod].update(t for t in targets if t in mods and t != mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_every_module_imports():
    for mod in sorted(import_graph()):
        if not mod.endswith("__main__"):  # running it is running the CLI
            importlib.import_module(mod)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles (runtime or type-only): {found}"


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# "layer_norm" is SAELens's normalize_activations value (sae/config.INPUT_NORMS), not a store key
STORE_PATHS = re.compile(
    r"""["'](saes/|models/|features/|tokenizations/|diffs/|locks/)|["']layer_(?!norm["'])|f["'][^"']*layer_\{"""
)


def test_store_paths_are_spelled_only_in_the_layout_module():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if path.relative_to(PKG).as_posix() == "format/layout.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if STORE_PATHS.search(code) and not code.strip().startswith(('"""', "'''")):
                offenders.append(f"{path.relative_to(PKG.parent)}:{n}: {line.strip()}")
    assert not offenders, "store keys spelled outside actstore/format/layout.py:\n" + "\n".join(
        offenders
    )


# attribute keys only the typed metadata spells (generic ones such as "complete" or "n_rows" are also table columns,
# and the hashes are also keys of `actstore info`'s output)
METADATA_KEYS = {
    "committed_rows",
    "unit_rows",
    "inner_rows",
    "channel_scale",
    "default_tokenization",
    "tokenizer_ids_sha256",
    "spilled_rows",
    "segment_rows",
    "never_fired_fraction",
    "bucket_features",
    "sae_sha256",
}


def metadata_key_literals(path: Path) -> list[str]:
    """``file:line: 'key'`` for each string literal in ``path`` that is one of METADATA_KEYS (docstrings are prose)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    return [
        f"{path.relative_to(PKG.parent)}:{n.lineno}: {n.value!r}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and n.value in METADATA_KEYS and id(n) not in docs
    ]


def test_metadata_keys_are_spelled_only_in_the_format_package():
    """Every reader and writer of a store's attributes goes through format/metadata.py: a typo in a key is a
    type error there, not a silently absent value somewhere else."""
    offenders = [
        o
        for path in sorted(PKG.rglob("*.py"))
        if path.relative_to(PKG).parts[0] != "format"
        for o in metadata_key_literals(path)
    ]
    assert not offenders, "metadata keys spelled outside actstore/format/:\n" + "\n".join(offenders)


def test_the_metadata_key_check_sees_a_literal(tmp_path):
    bad = PKG / "_probe_metadata_key.py"
    try:
        bad.write_text('def f(a):\n    return a["committed_rows"]\n')
        assert metadata_key_literals(bad) == ["actstore/_probe_metadata_key.py:2: 'committed_rows'"]
    finally:
        bad.unlink()


def test_import_actstore_does_not_load_torch():
    import subprocess
    import sys

    code = "import sys, actstore; actstore.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_names_survive_importing_every_subpackage():
    """A subpackage named like a public function (``actstore.features``) would replace it once imported."""
    import actstore

    for mod in sorted(import_graph()):
        if not mod.endswith("__main__"):
            importlib.import_module(mod)
    for name in actstore._EXPORTS:
        assert not isinstance(getattr(actstore, name), type(actstore)), (
            f"actstore.{name} is a module, not the public {name}"
        )


def test_no_module_imports_another_modules_private_names():
    """``from actstore.x import _helper`` couples a module to another's internals: make the name public or move it."""
    root = PKG.parent
    offenders = []
    for path in [
        *PKG.rglob("*.py"),
        *(root / "tests").glob("*.py"),
        *(root / "bench").glob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("actstore")
            ):
                offenders += [
                    f"{path.relative_to(root)}:{node.lineno}: {a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_config_modules_and_the_cli_import_no_heavy_library():
    """The CLI builds its options from the config dataclasses, so ``actstore --help`` must not pay for torch."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "matplotlib", "zarr", "duckdb", "polars", "fsspec")
    code = f"import sys, actstore.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- imports point left
LAYERS = (
    "format",
    "storage",
    "cluster",
    "data",
    "models",
    "store",
    "sae",
    "encoding",
    "effects",
    "query",
    "analysis",
    "browse",
    "paper",
    "cli",
    "testing",
)
"""The rooms from the bottom (docs/ARCHITECTURE.md): a package imports only packages to its left. ``testing`` (planted
stores for tests and benchmarks) sits above everything; nothing in the library imports it."""
BASE = {"actstore.errors", "actstore.version", "actstore.clock", "actstore.fields"}
"""Top-level modules every package may import."""


def layer_of(mod: str) -> int | None:
    """The index in LAYERS of a module's room (None: the base modules and the lazy facade ``actstore``)."""
    parts = mod.split(".")
    if mod in BASE or len(parts) < 2:
        return None
    return LAYERS.index(parts[1])


def rightward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{mod} -> {t}"
        for mod, targets in graph.items()
        for t in targets
        if layer_of(mod) is not None and layer_of(t) is not None and layer_of(t) > layer_of(mod)
    )


def test_every_module_is_in_a_named_room():
    unknown = [
        m
        for m in import_graph()
        if m not in BASE and m != "actstore" and m.split(".")[1] not in LAYERS
    ]
    assert not unknown, f"modules outside the rooms of docs/ARCHITECTURE.md: {unknown}"


def test_a_package_imports_only_packages_to_its_left():
    bad = rightward_imports(import_graph())
    assert not bad, "imports that point right (up the data flow):\n" + "\n".join(bad)


def test_the_direction_check_sees_an_import_to_the_right():
    assert rightward_imports({"actstore.store.reader": {"actstore.sae.model"}}) == [
        "actstore.store.reader -> actstore.sae.model"
    ]
    assert (
        rightward_imports({"actstore.sae.model": {"actstore.store.reader", "actstore.errors"}})
        == []
    )


# ---------------------------------------------------------------- architectures are objects
ARCH_NAMES = {"relu-l1", "topk", "batchtopk", "jumprelu"}
FOREIGN_NAMES_OK = {"sae/imports.py"}
"""Where an architecture's name may be compared: SAELens's own names, read from a foreign cfg.json."""


def arch_comparisons(path: Path) -> list[str]:
    """``file:line`` of each comparison with an architecture's name (``arch == "topk"``, ``in ("topk", ...)``)."""
    out = []
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.Compare):
            consts = [c for c in [n.left, *n.comparators] if isinstance(c, ast.Constant)]
            consts += [e for c in n.comparators if isinstance(c, ast.Tuple | ast.List | ast.Set) for e in c.elts
                       if isinstance(e, ast.Constant)]  # fmt: skip
            if any(c.value in ARCH_NAMES for c in consts):
                out.append(f"{path.relative_to(PKG.parent)}:{n.lineno}")
    return out


def test_no_module_compares_architecture_names():
    """The trainer, encoder, exporters and config ask the architecture object (sae/archs/) instead."""
    offenders = [o for path in sorted(PKG.rglob("*.py"))
                 if not path.relative_to(PKG).as_posix().startswith("sae/archs/")
                 and path.relative_to(PKG).as_posix() not in FOREIGN_NAMES_OK
                 for o in arch_comparisons(path)]  # fmt: skip
    assert not offenders, "architecture names compared outside sae/archs/:\n" + "\n".join(offenders)


def test_the_architecture_check_sees_a_comparison():
    bad = PKG / "_probe_arch.py"
    try:
        bad.write_text('def f(cfg):\n    return cfg.arch in ("topk", "batchtopk")\n')
        assert arch_comparisons(bad) == ["actstore/_probe_arch.py:2"]
    finally:
        bad.unlink()
