"""The package's modules import one another one way only: no circle, even under TYPE_CHECKING.

The flow the README draws (bytes → SSE → frames → events → consumer) is
kept in the imports: the transport reports transport facts and never names
the error table, the contract does not know the stream's implementation,
the errors sit above the events and below the contract, and a host's
streams do not reach into the host.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

import tgi_adapter

PACKAGE = Path(tgi_adapter.__file__).resolve().parent


def module_imports() -> Dict[str, Set[str]]:
    """Module name → the package's modules it imports (relative imports, wherever they stand)."""
    names: Dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: Dict[str, Set[str]] = {}
    for name, path in names.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                if node.module:
                    found.add(".".join(base + [node.module]))
                else:
                    found.update(".".join(base + [alias.name]) for alias in node.names)
        edges[name] = {target for target in found if target in names and target != name}
    return edges


def test_no_module_imports_itself_round_a_circle() -> None:
    edges = module_imports()
    edges.pop("tgi_adapter")  # the package's front door imports the public names from everywhere
    circles: List[List[str]] = []

    def walk(node: str, path: List[str], done: Set[str]) -> None:
        for target in sorted(edges.get(node, ())):
            if target in path:
                circles.append(path[path.index(target):] + [target])
            elif target not in done:
                done.add(target)
                walk(target, path + [target], done)

    for start in sorted(edges):
        walk(start, [start], {start})
    assert not circles, f"import circles: {circles[:3]}"


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("tgi_adapter.contract", "tgi_adapter.stream"),
        ("tgi_adapter.errors", "tgi_adapter.contract"),
        ("tgi_adapter.events", "tgi_adapter.errors"),
        ("tgi_adapter.transport", "tgi_adapter.mapping"),
        ("tgi_adapter.body", "tgi_adapter.mapping"),
        ("tgi_adapter.host_stream", "tgi_adapter.host"),
        ("tgi_adapter.mapping", "tgi_adapter.transport"),
    ],
)
def test_the_arrows_run_one_way(importer: str, imported: str) -> None:
    assert imported not in module_imports()[importer]
