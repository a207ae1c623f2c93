"""The docs point at code that exists: every function / class that README.md (and docs/*.md) names in a link to a
Python file is defined in that file, and no link uses line numbers (they drift with every edit)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[`([A-Za-z_][\w.]*)`[^\]]*\]\(([\w/.-]+\.py)(#L\d+)?\)")


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method names."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_named_functions_exist_where_linked():
    checked = 0
    for doc in DOCS:
        for name, target, anchor in LINK.findall(doc.read_text()):
            assert not anchor, f"{doc.name}: link to {target}{anchor} uses a line number; name the function instead"
            path = (doc.parent / target) if (doc.parent / target).exists() else ROOT / target
            assert path.exists(), f"{doc.name}: {target} does not exist"
            if name.endswith(".py") or "/" in name:
                continue
            assert name in defined_names(path), f"{doc.name}: `{name}` is not defined in {target}"
            checked += 1
    assert checked >= 30
