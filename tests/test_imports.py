"""The package's imports point down the data flow (config -> checkpoint -> model -> quantize -> export -> lower ->
build -> run -> commands), never back up, and form no cycle: read from the source, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import glmc

ROOT = Path(glmc.__file__).resolve().parent

# Module prefix -> its place in the flow (the longest matching prefix wins). A module may import its own level or
# a lower one. Commands (every cli*.py, the embedded API, the server) sit on top and may import anything.
LEVELS = {
    "glmc.errors": 0, "glmc.artifact": 0, "glmc.assets": 0,  # the neutral contracts
    "glmc.modeling_patches.config": 1,  # config
    "glmc.modeling_patches": 2,  # checkpoint, tokenizer, the model and its custom ops, the transformers oracle
    "glmc.quantization": 3,  # quantize
    "glmc.export": 4, "glmc.export.lower": 5,  # export, lower
    "glmc.compiler": 6,  # build: the compile YAML schema, build directories, the TensorRT builder
    "glmc.kernels": 7, "glmc.runtime": 7,  # run: kernels, backends, generation, verification through the backends
    "glmc.parallel": 7,  # run: tensor parallelism (shards the model, starts the ranks, the rank-0 backend)
    "glmc.compiler.pipeline": 8,  # the orchestrator: every stage, verification included
    "glmc.api": 9, "glmc.serve": 10, "glmc.cli": 11, "glmc": 11,
}
TOP = 11


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(module: str) -> int:
    if module.rsplit(".", 1)[-1].startswith("cli"):
        return TOP  # commands
    best = max((p for p in LEVELS if module == p or module.startswith(p + ".")), key=len)
    return LEVELS[best]


def imports(path: Path) -> set[str]:
    """The glmc modules a source file imports (anywhere in it), resolved to modules that exist."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("glmc") and (_exists(name)):
                found.add(name)
    return found


def _exists(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    files = [p for p in ROOT.rglob("*.py") if "assets" not in p.relative_to(ROOT).parts[:1] or p.name == "__init__.py"]
    return {module_name(p): {m for m in imports(p) if m != module_name(p)} for p in files}


def test_imports_point_down_the_flow():
    upward = sorted(f"{src} (level {level(src)}) imports {dst} (level {level(dst)})"
                    for src, dsts in graph().items() for dst in dsts
                    if level(dst) > level(src) and not src.startswith(dst + "."))
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_rule_itself_catches_an_upward_import(tmp_path):
    """The walker sees function-local imports, and the levels rank a model module below the runtime."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from glmc.runtime.generate import stream\n")
    assert "glmc.runtime.generate" in imports(src)
    assert level("glmc.modeling_patches.ops.attention") < level("glmc.runtime.generate")
    assert level("glmc.quantization.cli_eval") == TOP
