"""Every relative link of the README, of docs/*.md and of the examples'
READMEs resolves: the file (or directory) exists, and a `#anchor` names a
heading of the Markdown file it points to, as GitHub spells heading anchors.
Links inside code (fenced or indented blocks, backtick spans) are not links.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "examples").glob("*/README.md")),
]
#: [label](target) or ![alt](target); a label may hold one level of [...].
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)\)")


def prose(markdown: str) -> str:
    """The text outside code: fenced and indented blocks and backtick spans
    become blank (line breaks kept, so a span over two lines goes too)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        elif fenced or (line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|"))):
            out.append("")
        else:
            out.append(line)
    return re.sub(r"`[^`]*`", "", "\n".join(out))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped (word
    characters, spaces and hyphens kept), spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors of a file's headings (a repeated one gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken(doc: Path) -> list[str]:
    wrong = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            wrong.append(
                f"{target}: no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}"
            )
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text())):
            wrong.append(f"{target}: no heading #{anchor} in {dest.name}")
    return wrong


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc: Path) -> None:
    wrong = broken(doc)
    assert not wrong, f"{doc.relative_to(REPO)} links to what is not there:\n" + "\n".join(wrong)


def test_the_link_check_sees_a_broken_file_and_a_broken_anchor(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text(
        "# A title\n\n## `--dir` is not empty\n\n## Twice\n## Twice\n"
    )
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Here\n\n[ok](other.md#--dir-is-not-empty), [ok](other.md#twice-1), [ok](#here), "
        "[web](https://example.com/x)\n[gone](missing.md) [bad](other.md#nowhere) "
        "[bad](#there)\n\n    [in code](missing-too.md)\n`[span](missing-3.md)`\n"
    )
    assert broken(doc) == [
        f"missing.md: no {tmp_path / 'missing.md'}",
        "other.md#nowhere: no heading #nowhere in other.md",
        "#there: no heading #there in doc.md",
    ]


@pytest.mark.parametrize("index", ["README.md", "docs/README.md"])
def test_every_page_of_docs_is_linked_from_the_indexes(index: str) -> None:
    doc = REPO / index
    linked = {
        (doc.parent / target.partition("#")[0]).resolve()
        for target in LINK.findall(prose(doc.read_text()))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)
    }
    pages = {p.resolve() for p in (REPO / "docs").glob("*.md")} - {doc.resolve()}
    assert not pages - linked, f"{index} does not link to: {sorted(p.name for p in pages - linked)}"
