"""The README and the pages of docs/ hold what they promise.

Every ```python block of README.md and of every docs/*.md is executed in a fresh interpreter, in a temporary
working directory. A block whose first line is ``# requires: <data>`` needs files that are not shipped and is
only checked for syntax. Every relative link (and its ``#anchor``) points to a file (and heading) that exists,
and the README's test command is the one `.ci/run` runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
ALARMING = re.compile(r"warn|error|unexpected|deprecat|\[transformers\]", re.I)  # what no reader should see


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _blocks() -> list[tuple[Path, int, str]]:
    """(page, index within the page, code) of every python block, README first."""
    return [(page, i, code) for page in PAGES
            for i, code in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")))]


BLOCKS = _blocks()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to ``-``."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    anchors: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = base = _slug(heading)
        count = 0
        while slug in anchors:
            count += 1
            slug = f"{base}-{count}"
        anchors.add(slug)
    return anchors


def test_docs_pages_exist() -> None:
    names = {_name(p) for p in PAGES}
    for page in ("slo", "diagnostics", "huggingface", "experiments", "benchmarks"):
        assert f"docs/{page}.md" in names


def test_readme_has_an_example_per_package() -> None:
    readme = [code for page, _, code in BLOCKS if page == README]
    assert any("from slo_torch import" in code for code in readme)
    assert any("from diagnostics import" in code for code in readme)


def test_readme_links_every_docs_page() -> None:
    readme = README.read_text(encoding="utf-8")
    missing = [_name(p) for p in PAGES[1:] if f"]({_name(p)}" not in readme]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_relative_links_resolve(page: Path) -> None:
    """Every link that is not a URL names an existing file, and its #anchor a heading of that file."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(target)
    assert not broken, f"{_name(page)}: broken links {broken}"


def _commands(text: str) -> list[str]:
    """The command lines (not comments) of the ```bash blocks under the README's "Two commands" heading."""
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line and not line.startswith("#")]


def test_two_commands_and_ci() -> None:
    """The README's second command is the last line of .ci/run, which first installs the torch the README names."""
    readme = README.read_text(encoding="utf-8")
    main_job, test_command = _commands(readme)
    assert "examples/chain_monomial.py" in main_job
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
    pin = re.search(r'pip install -q "(torch==[\d.]+)"', "\n".join(ci)).group(1)
    assert f"pip install {pin}" in readme


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, subprocess.CompletedProcess]:
    """Every runnable block in its own fresh interpreter and working directory, two at a time (the blocks are
    independent; most of each run is importing torch, which uses one core)."""

    def run(index: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCKS[index][2]], cwd=tmp_path_factory.mktemp(f"block{index}"),
                              capture_output=True, text=True, timeout=600)

    runnable = [i for i, (_, _, code) in enumerate(BLOCKS) if not code.startswith("# requires:")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runnable, pool.map(run, runnable)))


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{_name(page)}-{i}" for page, i, _ in BLOCKS])
def test_python_block_runs(index: int, block_runs: dict[int, subprocess.CompletedProcess]) -> None:
    page, i, code = BLOCKS[index]
    where = f"{_name(page)} block {i}"
    if code.startswith("# requires:"):
        compile(code, where, "exec")
        return
    proc = block_runs[index]
    assert proc.returncode == 0, f"{where} failed:\n{code}\n--- stderr ---\n{proc.stderr}"
    alarming = [line for line in proc.stderr.splitlines() if ALARMING.search(line)]
    assert not alarming, f"{where} printed warnings:\n{code}\n--- stderr ---\n{proc.stderr}"
