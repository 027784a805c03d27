"""Code, configs, tests and docs name no issue, run, stop or round number: history lives in git.

Every text file of the package, configs, tests, benchmarks, scripts, the README and docs/*.md is searched.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("core", "rewards", "policies", "rl", "configs", "tests", "benchmarks", "scripts")
SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".md", ".toml", ".txt", ".jsonl"}
HISTORY = re.compile(r"\b(issue|run|stop|round) #?\d+[a-z]?\b", re.IGNORECASE)


def history_hits(path: Path, root: Path = ROOT):
    """``path:line: text`` (path relative to ``root``) of each line of ``path`` that names an issue, run, stop or
    round number."""
    return [f"{path.relative_to(root)}:{n}: {line.strip()}"
            for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if HISTORY.search(line)]


def searched_files():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in FOLDERS:
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def test_no_issue_run_stop_or_round_numbers():
    files = searched_files()
    assert any(p.name == "trainer.py" for p in files) and any(p.name == "README.md" for p in files)
    hits = [hit for path in files for hit in history_hits(path)]
    assert not hits, "history belongs in git, not in the source:\n" + "\n".join(hits)


def test_the_search_finds_planted_history(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Fixed in issue 7."""\n# as in run 9a\nx = 1  # since stop 18\n# Round 2 found it\n'
                       "# a round 2x2 grid; rerun 3 times; the stop token\n")
    assert [h.split(":")[1] for h in history_hits(planted, tmp_path)] == ["1", "2", "3", "4"]
