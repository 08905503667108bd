"""The documentation holds to the code: the README's settings table is generated, and links resolve.

Links are checked as GitHub renders them: a relative link must name a file or folder of the
repository, and a ``#anchor`` must be the slug of a heading in the page it points to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.settings import settings_table

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(markdown: str) -> str:
    """The text outside code: fenced blocks and inline code spans removed.

    >>> _prose("a `[x](y)` b\\n```\\n[c](d)\\n```\\n[e](f)")
    'a  b\\n\\n[e](f)'
    """
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text, lower case, punctuation dropped, spaces to hyphens.

    >>> github_slug("Jobs: big files over HTTP")
    'jobs-big-files-over-http'
    >>> github_slug("Speed and memory (`make bench`)")
    'speed-and-memory-make-bench'
    >>> github_slug("Ratios, same run [targets]")
    'ratios-same-run-targets'
    """
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2, ... for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    """The link targets of a page that point inside the repository (no scheme, no mail)."""
    targets = LINK.findall(_prose(page.read_text(encoding="utf-8")))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


def test_readme_settings_table_is_the_generated_one(readme: str) -> None:
    block = re.search(r"<!-- settings:begin -->\n(.*?)\n?<!-- settings:end -->", readme, re.S)
    assert block is not None, "README.md lacks the <!-- settings:begin --> ... <!-- settings:end --> block"
    assert block.group(1).strip("\n") == settings_table(), (
        "README.md's settings table differs from service/settings.py: run `python -m service.settings` and paste"
        " its output between the settings markers"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_headings(tmp_path: Path) -> None:
    """The checker itself: links in prose count, links in code do not, repeated headings get -1."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Part\n\n## Part\n\n[a](other.md#x) ![b](pic.png) [c](https://e.org) `[d](no.md)`\n"
        "```sh\n# not a heading\n[e](no.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["other.md#x", "pic.png"]
    assert anchors(page) == {"title", "part", "part-1"}
