"""The docs say what the code does, where a test can compare them without
running anything:

- Every line of ckpt's output the README, docs/ or an example's README quotes
  (a `ckpt: ...` span in backticks, or a `ckpt: ...` line of a transcript
  in a code block) is one the code can print: it matches a message
  template of cli/ckpt_cli (its f-strings and string constants, each
  `{...}` standing for any value). A quote may leave out a value as `...`,
  or the rest of a line as a final `...`; any other word must be the
  code's own. (A paraphrase is not a quote: quote, or say it in your words
  without backticks.)
- The list of temp names in docs/consistency.md is `TEMP_PATTERNS` of shims/ckpt/_contract.py,
  in its order.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

from ckpt._contract import TEMP_PATTERNS

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "cli" / "ckpt_cli").rglob("*.py"))
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "examples").glob("*/README.md")),
]
#: What console puts before a message: the prefix, then the level's word.
LEVELS = re.compile(r"^ckpt: (?:(?:warning|error|debug):(?: |$))?")
#: A value inside a template (any text, maybe none).
HOLE = "\x00"


# ---------------------------------------------------------------- templates


def _parts(node: ast.expr) -> list[str] | None:
    """A string expression as literal pieces and HOLEs (None: not a string)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.append(value.value)
            else:
                out.append(HOLE)
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _parts(node.left), _parts(node.right)
        if left is None and right is None:
            return None
        return [*(left or [HOLE]), *(right or [HOLE])]
    return None


@functools.cache
def templates() -> tuple[str, ...]:
    """Every message the code may print, values as HOLEs (outermost string
    expressions only; a conditional inside a message is a HOLE too)."""
    found: set[str] = set()
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        inner: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp | ast.JoinedStr):
                inner.update(id(child) for child in ast.iter_child_nodes(node))
        for node in ast.walk(tree):
            if id(node) in inner or not isinstance(node, ast.expr):
                continue
            parts = _parts(node)
            if parts is not None:
                text = "".join(parts)
                if len(text.replace(HOLE, "")) >= 4:
                    found.add(text)
    return tuple(sorted(found))


def _regex(template: str) -> str:
    return ".*?".join(re.escape(piece) for piece in template.split(HOLE))


@functools.cache
def _compiled(template: str) -> re.Pattern[str]:
    return re.compile(_regex(template), re.S)


@functools.cache
def _prefixes(template: str) -> re.Pattern[str]:
    """Matches every prefix of what the template can print."""
    pieces = template.split(HOLE)

    def tail(i: int) -> str:  # pieces[i:], each may stop short
        piece = pieces[i]
        cut = "".join(f"(?:{re.escape(ch)}" for ch in piece) + ")?" * len(piece)
        if i + 1 == len(pieces):
            return cut
        return f"(?:{re.escape(piece)}.*?(?:{tail(i + 1)})|{cut})"

    return re.compile(tail(0), re.S)


def explained(quote: str) -> bool:
    """True if some template can print the quote (LEVELS stripped; `...`
    for a value, a final `...` for the rest of the line)."""
    text = LEVELS.sub("", quote.strip())
    rest = text.endswith("...")
    body = text[:-3].rstrip() if rest else text
    for t in templates():
        if _compiled(t).fullmatch(text):
            return True
        if rest and _prefixes(t).fullmatch(body):
            return True
    return False


# ---------------------------------------------------------------- quotes


def quotes(markdown: str) -> list[str]:
    """ckpt's lines a document quotes: backtick spans starting `ckpt: `
    (line breaks inside one are spaces), and `ckpt: ` lines of indented
    code blocks (transcripts)."""
    found = [" ".join(span.split()) for span in re.findall(r"`(ckpt: [^`]*)`", markdown)]
    found += [line.strip() for line in markdown.splitlines() if re.match(r"^ {4,}ckpt: ", line)]
    # `ckpt: error:` and `ckpt: ...` name the form of a line, not a line.
    return [q for q in found if LEVELS.sub("", q).strip(" .")]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_quoted_line_of_ckpt_is_one_the_code_prints(doc: Path) -> None:
    wrong = [q for q in quotes(doc.read_text()) if not explained(q)]
    assert not wrong, f"{doc.name} quotes lines ckpt does not print:\n" + "\n".join(wrong)


def test_the_quote_check_tells_a_real_line_from_an_invented_one() -> None:
    assert explained("ckpt: final state is durable as snapshot b406f166")
    assert explained("ckpt: warning: preemption notice: aws terminate, about 115s left (...)")
    assert explained(
        "ckpt: error: final snapshot not durable after 15s (--flush-timeout); newest durable "
        "snapshot is ..."
    )
    assert explained("ckpt: preemption: watching the spot instance-action notice ...")
    assert not explained("ckpt: there is no repository yet")
    assert not explained("ckpt: final snapshot not durable after 15s")  # the rest is not "..."
    assert quotes("see `ckpt: remote: s3://b/run\n(from env CKPT_REMOTE)`, `ckpt: error:` and\n"
                  "    $ ckpt ls\n    ckpt: a line\n") == [
        "ckpt: remote: s3://b/run (from env CKPT_REMOTE)",
        "ckpt: a line",
    ]  # fmt: skip


# ---------------------------------------------------------------- temp names


def test_the_readme_lists_the_temp_names_of_the_contract() -> None:
    readme = " ".join((REPO / "docs" / "consistency.md").read_text().split())
    match = re.search(r"Temp names are never snapshotted(.*?)\.(?: |$)", readme)
    assert match, "the README's sentence listing the temp names is gone"
    names = re.sub(r"\([^()]*\)", "", match.group(1))  # remarks in parentheses
    listed = re.findall(r"`([^`]+)`", names)
    assert tuple(listed) == TEMP_PATTERNS
