"""The prose: every relative link and anchor in README.md, CHANGELOG.md and docs/ resolves (a file that exists, a
heading that exists, as GitHub renders them), and the README's two test commands sit where .ci/run reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target): the target, up to a space or the parenthesis
FENCE = re.compile(r"^(```|~~~)")


def prose(page: Path) -> list[str]:
    """The page's lines outside fenced code blocks (links there are code, not links)."""
    lines, fenced = [], False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation but hyphens and underscores dropped,
    spaces to hyphens, and a repeated heading numbered (-1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for line in prose(page):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1)).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    targets = []
    for line in prose(page):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        targets += LINK.findall(line)
    return targets


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here (no network in CI)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_anchor_rule_follows_github():
    page = ROOT / "docs" / "checkpoints.md"
    assert "faults" in anchors(page)
    assert anchors(ROOT / "README.md") >= {"quickstart", "status"}


def ci_command(readme: str, marker: str) -> list[str]:
    """The marker's line and the three after it: .ci/run runs the third line after the marker
    (`grep -A2 "<!-- ci: X -->" README.md | sed -n 3p`), so they must be the marker, a bash fence, the command
    and the fence's end."""
    lines = readme.splitlines()
    found = [i for i, line in enumerate(lines) if f"<!-- ci: {marker} -->" in line]
    assert len(found) == 1, f"README.md: {len(found)} lines hold <!-- ci: {marker} -->, .ci/run needs exactly one"
    return lines[found[0] : found[0] + 4]


@pytest.mark.parametrize("marker", ["test command", "second tier"])
def test_the_ci_commands_follow_their_markers(marker):
    marker_line, fence, command, end = ci_command((ROOT / "README.md").read_text(encoding="utf-8"), marker)
    assert marker_line.strip() == f"<!-- ci: {marker} -->"
    assert fence == "```bash" and end == "```", f"<!-- ci: {marker} --> must be followed by a bash fence"
    assert "pytest -n auto --dist loadfile" in command
    assert ("--second-tier" in command) == (marker == "second tier")


def test_the_readmes_runs_after_the_quickstart_name_their_own_out_dir():
    """The own-data command (`fasttrain train base --set data.dir=data/mine`) trained into runs/base, where the
    Quickstart's run is, and was refused: each command after the first that trains base names its train.out_dir."""
    quickstart = (ROOT / "README.md").read_text(encoding="utf-8").split("## Quickstart")[1].split("\n## ")[0]
    fenced = re.findall(r"^```bash\n(.*?)^```", quickstart, re.M | re.S)
    commands = [line.split("#")[0] for block in fenced for line in block.splitlines()]
    prose = re.sub(r"^```bash\n.*?^```", "", quickstart, flags=re.M | re.S).replace("\n", " ")
    commands += re.findall(r"`([^`]*)`", prose)
    trains = [c for c in commands if c.startswith("fasttrain train base ") and "--dry-run" not in c]
    assert any("data.dir=data/mine" in c for c in trains)
    assert [c for c in trains if "train.out_dir=" not in c] == []


def test_the_readmes_benchmark_command_says_it_needs_the_test_extra():
    """`pytest benchmarks/ --benchmark-only` needs pytest-benchmark, an extra (`.[test]`) the README did not name."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8").replace("\n", " ")
    mention = readme[readme.index("`pytest benchmarks/ --benchmark-only`") :][:200]
    assert '`pip install -e ".[test]"`' in mention, mention


def test_the_readmes_transformers_line_says_what_to_install():
    """The README's transformers one-liner, run after its install (`pip install -e .`), was "No module named
    'transformers'": only `.[eval]` and `.[test]` bring it. The line, or the one before it, says what to install."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    uses = [i for i, line in enumerate(lines) if "from transformers import" in line]
    assert uses
    for i in uses:
        assert "pip install transformers" in lines[i - 1] + lines[i], lines[i - 1 : i + 1]
