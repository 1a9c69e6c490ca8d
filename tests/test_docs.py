"""The README is a short front page, and every relative link in README.md, CHANGELOG.md, docs/ and
bench/results/ leads to a file that exists (and to a heading in it, when the link names one).

Pure file checks, no TensorFlow: they run in well under a second.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *DOCS, *sorted((ROOT / "bench" / "results").glob("*.md"))]
# [text](target) or [text](target "title"); images too. Reference-style links are not used in these pages.
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def relative_links(page: Path) -> list[str]:
    """The relative link targets of a Markdown page (`#anchor` alone: within the page), code left out."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = []
    for target in LINK.findall(text):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto: ...
            targets.append(target)
    return targets


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    slugs = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE):
        slugs.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return slugs


def test_readme_is_a_short_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail to docs/"


def test_readme_has_no_machine_names_history_or_temporary_paths():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for phrase in ("Xeon", "EPYC", "this round", "this session", "/tmp/", "development machine"):
        assert phrase.lower() not in text.lower(), f"README.md mentions {phrase!r}"


def test_there_are_topic_pages():
    assert len(DOCS) >= 5, "docs/ should hold at least five topic pages"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_link_checker_sees_links_and_skips_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "See [the docs](docs/a.md#top), [site](https://example.com) and [here](#here).\n"
        "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n![plot](img/p.png \"a plot\")\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["docs/a.md#top", "#here", "img/p.png"]


def test_anchors_follow_githubs_heading_slugs(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Distribution, preemption and resume\n## The `idx:` format\n```\n# not a heading\n```\n",
                    encoding="utf-8")
    assert anchors(page) == {"distribution-preemption-and-resume", "the-idx-format"}
