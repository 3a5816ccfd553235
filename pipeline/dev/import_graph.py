"""The package's import graph from its source (`ast`, nothing imported): `python -m pipeline.dev.import_graph`.

Prints each module's imports of the package (`->`; lazy imports inside functions count too, those under
`if TYPE_CHECKING:` do not: they name types and run nowhere), the same between its folders, the modules that
import Ray, and every cycle (a strongly connected component of more than one module, or of more than one folder).
Exits 1 when there is a cycle or Ray is imported outside `pipeline.ray`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    names: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _runtime_nodes(tree: ast.AST):
    """Every node that may run, leaving out the bodies of `if TYPE_CHECKING:` (their `else:` runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph(root: Path = PACKAGE) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> third-party top-level names it imports)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    edges: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        names = imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        edges[module] = {n for n in names if n in files and n != module}
        external[module] = {n.split(".")[0] for n in names if n and not n.startswith(root.name)}
    return edges, external


def folder_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same imports between the package's folders (a top-level module counts as its own folder)."""
    folder = lambda module: module.split(".")[1] if module.count(".") else module
    found: dict[str, set[str]] = {}
    for module, imported in edges.items():
        targets = {folder(m) for m in imported} - {folder(module)}
        if targets:
            found.setdefault(folder(module), set()).update(targets)
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[0]).resolve() if argv else PACKAGE
    edges, external = graph(root)
    for module in sorted(edges):
        print(f"{module} -> {', '.join(sorted(edges[module])) or '(nothing of the package)'}")
    adapter = f"{root.name}.ray"
    ray_users = sorted(m for m, names in external.items() if "ray" in names)
    outside = [m for m in ray_users if not (m == adapter or m.startswith(adapter + "."))]
    found = cycles(edges)
    print("\nfolders:")
    for folder, imported in sorted(folder_graph(edges).items()):
        print(f"  {folder} -> {', '.join(sorted(imported))}")
    print(f"\n{len(edges)} modules, {sum(map(len, edges.values()))} imports between them")
    print(f"import ray: {', '.join(ray_users) or 'none'}")
    print(f"  outside {adapter}: {', '.join(outside) or 'none'}")
    found += cycles(folder_graph(edges))
    print(f"cycles (modules, then folders): {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    return 1 if found or outside else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
