"""The README is a short front door and the docs/ pages hold the rest: the README stays short, every relative link
in README.md, docs/*.md and benchmarks/README.md leads to a file that exists (and, inside README/docs, to a heading
that exists), and every benchmark script and results file the README or docs cite is in the repository.

Plain text checks: nothing here imports skAIn.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
BENCHMARKS = ROOT / "benchmarks"
README_MAX_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")
RESULTS = re.compile(r"benchmarks/results/[\w./-]+?\.json")
SCRIPT_PATH = re.compile(r"\bbenchmarks/[a-z0-9_/]+\.(?:py|sh)\b")
SCRIPT_MODULE = re.compile(r"\bbenchmarks(?:\.[a-z0-9_]+)+\b")
MOVED_PACKAGES = ("speed", "accuracy")  # benchmarks/<package>/<script>.py, replacing benchmarks/<script>.py


# ------------------------------------------------------------------------------------------- helpers
def documentation_files() -> list[Path]:
    """README.md, docs/*.md and, where someone wrote it, benchmarks/README.md."""
    files = [README, *sorted(DOCS.glob("*.md"))]
    if (BENCHMARKS / "README.md").is_file():
        files.append(BENCHMARKS / "README.md")
    return files


def own_files() -> list[Path]:
    """The files whose citations and anchors this test holds to account: README.md and docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """Markdown without fenced code blocks and inline code (brackets in code are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def relative_links(text: str) -> list[str]:
    """Every link target in the markdown that is neither external nor code."""
    return [t for t in LINK.findall(prose(text)) if not t.lower().startswith(EXTERNAL)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a markdown text's headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", text).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(path: Path, text: str | None = None, check_anchors: bool = False) -> list[str]:
    """Relative links in `path` (or in `text`, read as if it were at `path`) whose file is missing; with
    `check_anchors`, also links into a markdown file whose #anchor names no heading there."""
    text = path.read_text() if text is None else text
    broken = []
    for target in relative_links(text):
        file_part, _, anchor = target.partition("#")
        if not file_part:  # a link into this same page
            if check_anchors and anchor.lower() not in anchors(text):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading here)")
            continue
        dest = (path.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif check_anchors and anchor and dest.suffix == ".md" and anchor.lower() not in anchors(dest.read_text()):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no heading #{anchor} in {dest.name})")
    return broken


def cited_results(text: str) -> set[str]:
    return set(RESULTS.findall(text))


def cited_scripts(text: str) -> set[str]:
    """Benchmark scripts named as a path (`benchmarks/speed/web_latency.py`, `benchmarks/gpu/run.sh`) or run as a module
    (`python -m benchmarks.speed.web_latency`), as repository paths. Placeholders such as NAME are not names."""
    paths = set(SCRIPT_PATH.findall(text))
    paths |= {m.replace(".", "/") + ".py" for m in SCRIPT_MODULE.findall(text) if m.count(".") >= 2}
    return paths


def script_exists(cited: str, root: Path = ROOT) -> bool:
    """The cited script is there. While the benchmarks are being moved into packages (benchmarks/speed/,
    benchmarks/accuracy/), and only until that package folder exists, the script's old place
    benchmarks/<name>.py counts too; once the folder exists, the cited path itself must exist."""
    if (root / cited).is_file():
        return True
    parts = Path(cited).parts
    if len(parts) == 3 and parts[1] in MOVED_PACKAGES and not (root / "benchmarks" / parts[1]).is_dir():
        return (root / "benchmarks" / parts[2]).is_file()
    return False


def all_own_text() -> str:
    return "\n".join(p.read_text() for p in own_files())


# ------------------------------------------------------------------------------------------- the helpers can fail
def test_the_checks_catch_made_up_mistakes():
    page = DOCS / "made-up.md"  # never written: its text is passed in, links resolve from docs/
    text = ("# Title\n\n## A section\n\nSee [a page](no-such-page.md), [the training doc](training.md), "
            "[a heading](training.md#no-such-heading), [this section](#a-section), [missing](#nowhere), "
            "[the web](https://example.org/x.md), [mail](mailto:a@b.c) and `[code](not-a-link.md)`.\n"
            "```bash\necho [x](also-not-a-link.md)\n```\n")
    assert relative_links(text) == ["no-such-page.md", "training.md", "training.md#no-such-heading",
                                    "#a-section", "#nowhere"]
    assert broken_links(page, text) == ["docs/made-up.md: no-such-page.md (no such file)"]
    assert broken_links(page, text, check_anchors=True) == [
        "docs/made-up.md: no-such-page.md (no such file)",
        "docs/made-up.md: training.md#no-such-heading (no heading #no-such-heading in training.md)",
        "docs/made-up.md: #nowhere (no such heading here)"]
    assert slug("Outputs (`--output`, default `outputs/`)") == "outputs---output-default-outputs"

    cites = ("`python -m benchmarks.speed.no_such_bench --x`, `benchmarks/accuracy/no_such_eval.py`, "
             "`benchmarks/results/no_such_result.json`, `python -m benchmarks.speed.NAME`, `benchmarks/gpu/no.sh`")
    assert cited_scripts(cites) == {"benchmarks/speed/no_such_bench.py", "benchmarks/accuracy/no_such_eval.py",
                                    "benchmarks/gpu/no.sh"}
    assert not any(script_exists(s) for s in cited_scripts(cites))
    assert cited_results(cites) == {"benchmarks/results/no_such_result.json"}
    assert not (ROOT / "benchmarks/results/no_such_result.json").exists()


def test_script_exists_accepts_the_old_place_only_until_the_package_folder_exists(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "web_latency.py").write_text("")
    assert script_exists("benchmarks/speed/web_latency.py", tmp_path)       # not moved yet: the old place counts
    assert not script_exists("benchmarks/speed/web_load.py", tmp_path)      # in neither place
    (tmp_path / "benchmarks" / "speed").mkdir()
    assert not script_exists("benchmarks/speed/web_latency.py", tmp_path)   # moved: the cited path must exist
    (tmp_path / "benchmarks" / "speed" / "web_latency.py").write_text("")
    assert script_exists("benchmarks/speed/web_latency.py", tmp_path)
    assert not script_exists("benchmarks/gpu/nothing.py", tmp_path)


# ------------------------------------------------------------------------------------------- the real files
def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_docs_folder_has_its_index():
    assert (DOCS / "README.md").is_file()
    assert "docs/README.md" in relative_links(README.read_text())


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files(path):
    assert broken_links(path, check_anchors=path in own_files()) == []


def test_cited_results_files_exist():
    cited = cited_results(all_own_text())
    assert cited, "README/docs cite no benchmarks/results/*.json at all: the pattern no longer matches"
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert missing == []


def test_cited_benchmark_scripts_exist():
    cited = cited_scripts(all_own_text())
    assert cited, "README/docs cite no benchmark script at all: the pattern no longer matches"
    missing = sorted(c for c in cited if not script_exists(c))
    assert missing == []
