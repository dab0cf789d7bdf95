"""README stays short and the documentation holds together: every relative link in README.md and
docs/ names a file that exists and, after `#`, a heading in it (GitHub's anchor rules), and a
long doc opens with a table of contents."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def without_code(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", without_code(page.read_text()), flags=re.M)}


def test_anchor_rule_matches_github():
    assert anchor("Weight-only quantization (int8 / int4)") == "weight-only-quantization-int8--int4"
    assert anchor("Data: tasks, sources and `python -m gptj.data`") == "data-tasks-sources-and-python--m-gptjdata"


def test_readme_is_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(without_code(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked (no network)
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_a_long_doc_opens_with_a_table_of_contents(page):
    lines = page.read_text().splitlines()
    if len(lines) <= 150:
        return
    opening = "\n".join(lines[:30])
    own = {m for m in re.findall(r"\]\(#([^)]+)\)", opening)}
    sections = anchors(page) - {anchor(lines[0].lstrip("# "))}
    assert len(own & sections) >= 3, f"{page.name}: {len(lines)} lines and no table of contents at the top"
