"""The shape of the code: imports run one way, no import circle anywhere, modules small enough to read."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = ("embedder", "index", "recommend")
# what each part may import from the project; `recommend.config` sits beside the subpackages (it
# composes their settings models) and `recommend.cli` is on top
MAY_IMPORT = {
    "embedder": ("embedder",),
    "index": ("index", "embedder.artifacts", "embedder.errors"),  # never embedder's internals
    "recommend.ranking": ("embedder", "index", "recommend.ranking"),
    "recommend.quality": ("embedder", "index", "recommend.ranking", "recommend.quality"),
    "recommend.serving": ("embedder", "index", "recommend.ranking", "recommend.serving", "recommend.config"),
    "recommend.config": ("embedder", "index", "recommend.ranking", "recommend.quality", "recommend.serving.settings"),
    "recommend.run": ("embedder", "index", "recommend.ranking", "recommend.quality", "recommend.serving",
                      "recommend.config", "recommend.run"),
    "recommend.cli": ("embedder", "index", "recommend"),
    "recommend": (),  # the package itself imports nothing
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports (at any depth of its code: a lazy import counts)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets |= {n for n in names if n in modules and n != name}
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if v.startswith(u + ".") or u.startswith(v + "."):
                continue  # a package and its own submodules
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (found := visit(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if not state.get(u) and (found := visit(u)):
            return found
    return None


def test_no_import_cycle_anywhere():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_one_way():
    wrong = []
    for name, targets in _imports(_modules()).items():
        part = max((p for p in MAY_IMPORT if name == p or name.startswith(p + ".")), key=len)
        for target in targets:
            if not any(target == ok or target.startswith(ok + ".") for ok in MAY_IMPORT[part]):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_rules_catch_what_they_name():
    """The checks above, on a made-up graph: a circle is found, and so is index importing recommend."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    part = max((p for p in MAY_IMPORT if "index.build" == p or "index.build".startswith(p + ".")), key=len)
    assert not any("recommend.ranking.blend".startswith(ok) for ok in MAY_IMPORT[part])


def test_modules_are_small_enough_to_read():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
