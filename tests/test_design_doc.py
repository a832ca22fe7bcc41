"""The design lives in the repository: every `design.md §x` (or old `DESIGN §x`) citation in the
code, tests and docs names a numbered heading of docs/design.md, and no file cites a scratch
path outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"(?:DESIGN|design\.md) §(\d+(?:\.\d+)*)(?:\s*-\s*(\d+(?:\.\d+)*))?")
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", re.MULTILINE)


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()  # its examples are not citations
    return [
        ROOT / p
        for p in out
        if p.endswith((".py", ".md", ".toml", ".sh", ".yml", ".txt")) and p != this
    ]


def headings() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text()))


def citations() -> list[tuple[str, str]]:
    """(file, section number) for every citation; a range a-b cites both ends."""
    found = []
    for path in _tracked_text_files():
        if not path.is_file():
            continue
        for m in CITATION.finditer(path.read_text(errors="replace")):
            rel = str(path.relative_to(ROOT))
            found.append((rel, m.group(1)))
            if m.group(2):
                found.append((rel, m.group(2)))
    return found


def test_design_doc_has_its_numbered_sections() -> None:
    assert {"1", "1.1", "2", "3", "3.2", "3.3", "3.4", "4", "4.1", "5", "6"} <= headings()


def test_every_citation_resolves_to_a_heading() -> None:
    cites = citations()
    assert len(cites) > 20  # the reader finds the citations
    known = headings()
    missing = sorted({(f, s) for f, s in cites if s not in known})
    assert missing == [], f"citations without a heading in docs/design.md: {missing}"


def test_citations_name_the_file_in_the_repo() -> None:
    old = sorted({f for f, _ in citations() if "DESIGN §" in (ROOT / f).read_text()})
    assert old == [], f"cite design.md, not the founders' DESIGN file: {old}"


def test_no_citation_of_a_scratch_path() -> None:
    bad = [
        str(p.relative_to(ROOT))
        for p in _tracked_text_files()
        if p.is_file() and re.search(r"/tmp/\w+/\w+\.md", p.read_text(errors="replace"))
    ]
    assert bad == [], bad


def test_a_wrong_citation_is_caught() -> None:
    m = CITATION.search("see design.md §9.9 and DESIGN §3.2-3.3")
    assert m is not None and m.group(1) == "9.9"
    assert "9.9" not in headings()
