"""mom_wrap's modules import one way: no circle in the graph of their imports, those inside functions included
(a lazy import that closes a circle still ties two modules to each other)."""
import ast
from pathlib import Path

import mom_wrap

ROOT = Path(mom_wrap.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """module -> the mom_wrap modules it imports (``from mom_wrap.x import y`` names module ``mom_wrap.x.y`` where
    that is a module); the package ``mom_wrap`` itself, which only re-exports, is left out."""
    names = {'.'.join(p.relative_to(ROOT.parent).with_suffix('').parts).removesuffix('.__init__'): p
             for p in ROOT.rglob('*.py')}
    graph = {}
    for name, path in names.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('mom_wrap'):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith('mom_wrap')}
        graph[name] = {d for d in deps if d in names and d not in (name, 'mom_wrap')}
    graph.pop('mom_wrap')
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on.discard(component[-1])
            if len(component) > 1:
                out.append(sorted(component))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    graph = import_graph()
    assert 'mom_wrap.wrapper' in graph['mom_wrap.convert']  # the graph sees the imports
    assert cycles(graph) == []


def test_cycles_finds_a_circle():
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
