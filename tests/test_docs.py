"""The front door: README and docs/ links resolve, every docs page is reachable from the README, the
README's headline figures are the ones in the results files they link to, and CI runs the README's
test command."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "benchmarks" / "results" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))  # code blocks hold commands, not links
    return [m.group(1) for m in LINK.finditer(text)]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for link in _links(page):
            if re.match(r"^[a-z]+:", link):  # http(s), mailto: not checked here (no network)
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.relative_to(ROOT)}: {link} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in _links(README)}
    missing = [page.name for page in DOCS if page.resolve() not in linked]
    assert DOCS and not missing, f"docs pages not linked from README.md: {missing}"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 150, f"README.md has {lines} lines; move depth into docs/"


def test_readme_figures_match_the_results_they_link_to() -> None:
    """Each bold figure of the README's results table appears in the results file its row links first."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Measured results", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "**" in line]
    assert rows, "no results table under '## Measured results'"
    for row in rows:
        figures = re.findall(r"\*\*([\d.,]+)\*\*", row)
        source = (ROOT / LINK.search(row).group(1).partition("#")[0]).resolve()
        assert figures and source.is_relative_to(ROOT / "benchmarks"), f"row without a figure or results link: {row}"
        body = source.read_text(encoding="utf-8")
        for figure in figures:
            assert figure in body, f"README says {figure}, {source.relative_to(ROOT)} does not: {row}"


def test_ci_runs_the_readme_commands() -> None:
    first_block = re.search(r"^```bash\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    serve_cmd, test_cmd = first_block.group(1).strip().splitlines()
    assert serve_cmd.startswith("bash setup.sh &&") and "--dev" not in serve_cmd  # the serving install
    assert "--dev" in test_cmd
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert ci[-1] == test_cmd, f".ci/run runs {ci[-1]!r}, the README says {test_cmd!r}"


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for part in match.group(1).split(",") for p in _expand_braces(head + part + tail)]


def test_every_results_file_is_indexed() -> None:
    """benchmarks/results/README.md names the script and machine of every file there (first column)."""
    index = ROOT / "benchmarks" / "results" / "README.md"
    patterns = [
        p.rstrip("/")
        for line in index.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
        for token in re.findall(r"`([^`]+)`", line.split("|")[1])
        for p in _expand_braces(token)
    ]
    # Committed files only: a run's scratch output in a working tree is not a result yet.
    listed = subprocess.run(
        ["git", "ls-files", "."], cwd=index.parent, capture_output=True, text=True, check=True
    ).stdout.split()
    entries = {path.split("/")[0] for path in listed} - {"README.md"}
    missing = [
        name for name in entries if not any(fnmatch.fnmatch(name, pattern.split("/")[0]) for pattern in patterns)
    ]
    assert not missing, f"not in {index.relative_to(ROOT)}: {sorted(missing)}"
