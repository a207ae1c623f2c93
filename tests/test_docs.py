"""The docs point at code that exists: every function / class that README.md (and docs/*.md) names in a link to a
Python file is defined in that file, and no link uses line numbers (they drift with every edit). The docs read in
one sitting: no line over 120 characters, a README of at most 15,000 bytes, and no mention of work sessions
("session 9" means nothing to a reader: docs name dates and commits)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_DOCS = [*DOCS, ROOT / "scripts" / "paper" / "README.md"]
MAX_LINE = 120
MAX_README_BYTES = 15_000
SESSION = re.compile(r"\bsessions?[ -]\d+", re.IGNORECASE)
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


def test_docs_read_in_one_sitting():
    long_lines, sessions = [], []
    for doc in ALL_DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            where = f"{doc.relative_to(ROOT)}:{n}"
            if len(line) > MAX_LINE:
                long_lines.append(f"{where} ({len(line)} characters)")
            if SESSION.search(line):
                sessions.append(f"{where}: {SESSION.search(line).group(0)!r}")
    assert not long_lines, f"lines over {MAX_LINE} characters (wrap the prose, reword the table): {long_lines}"
    assert not sessions, f"docs name dates and commits, not work sessions: {sessions}"
    size = (ROOT / "README.md").stat().st_size
    assert size <= MAX_README_BYTES, f"README.md is {size:,} bytes (at most {MAX_README_BYTES:,}): move detail to docs/"

