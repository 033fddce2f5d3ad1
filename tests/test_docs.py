"""The README and the docs site say what the code does: every Python block runs as written, on its
own, in a fresh interpreter; every command names real flags; the tables of measured results are
the ones ``benchmarks.report`` generates from the committed result files; the site builds with
``mkdocs build --strict``; and the README stays one screen with the two set-up commands."""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
TEXT = {p: p.read_text() for p in PAGES}
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]" && python train.py'
TEST = "python -m pytest -n auto"
README_LIMIT = 12_000  # bytes: one screen; everything else lives in docs/


def fenced(text: str, lang: str) -> list[str]:
    """The ```lang blocks of a Markdown text (dedented: blocks nested in list items are indented)."""
    return [textwrap.dedent(b) for b in re.findall(rf"^[ \t]*```{lang}\n(.*?)^[ \t]*```", text, flags=re.S | re.M)]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# each distinct block once (the ten-line example is in the README and in getting-started)
PYTHON = {}
for _page in PAGES:
    for _i, _code in enumerate(fenced(TEXT[_page], "python")):
        PYTHON.setdefault(_code, f"{rel(_page)}:{_i}")
BLOCKS = sorted((where, code) for code, where in PYTHON.items())


def test_pages_have_examples():
    assert len(fenced(TEXT[README], "python")) >= 2
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("where,code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_python_block_runs_on_its_own(where, code, tmp_path):
    if "import torch" in code:
        pytest.importorskip("torch")
    if "import keras" in code and importlib.util.find_spec("keras") is None:  # not imported here: the block
        pytest.skip("keras is not installed (the keras extra)")                # picks its backend itself
    # a fresh interpreter, started outside the checkout: no imports lent by another block or by pytest
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where} failed:\n{code}\n{proc.stderr[-3000:]}"


def commands() -> list[tuple[str, str]]:
    """``(page, command line)`` of every line of every bash block (comments dropped) and of every
    inline code span that starts a Python program."""
    found = []
    for page in PAGES:
        for block in fenced(TEXT[page], "bash"):
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found.append((rel(page), line))
        prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", TEXT[page], flags=re.S | re.M)
        found += [(rel(page), span) for span in re.findall(r"`([^`\n]+)`", prose)
                  if re.match(r"(\w+=\S+ )*python3? ", span)]
    return found


def test_commands_name_real_programs_and_flags():
    """``python train.py`` / ``sample.py`` lines parse with the scripts' own parsers; ``python -m``
    lines name a module of the checkout whose source defines every flag given."""
    from lstm_jax.charlm import sample as sample_cli
    from lstm_jax.charlm import train as train_cli

    parsers = {"train.py": train_cli.parse_args, "sample.py": sample_cli.parse_args}
    seen = set()
    for page, line in commands():
        for part in line.split("&&"):
            words = shlex.split(part)
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if len(words) < 2 or words[0] not in ("python", "python3"):
                continue
            if words[1] in parsers:
                seen.add(words[1])
                if len(words) == 2:  # the program named in prose ("`python sample.py`"), no command line
                    continue
                try:
                    parsers[words[1]](words[2:])
                except SystemExit as exit:  # argparse: 2 for an unknown flag or a bad value, 0 for --help
                    assert exit.code == 0, f"{page}: `{part.strip()}` does not parse"
            elif words[1] == "-m" and words[2] not in ("pytest", "venv", "mkdocs"):
                source = ROOT / (words[2].replace(".", "/") + ".py")
                assert source.is_file(), f"{page}: `{part.strip()}` names no module of the checkout"
                own = words[3:words.index("--")] if "--" in words else words[3:]  # after --: another program's
                # benchmarks.quality hands the flags it does not know to train.py's parser
                known = source.read_text() + ((ROOT / "lstm_jax/charlm/train.py").read_text()
                                              if words[2] == "benchmarks.quality" else "")
                for flag in (w for w in own if w.startswith("--")):
                    assert f'"{flag}"' in known, f"{page}: {words[2]} has no flag {flag}"
                seen.add(words[2])
    assert {"train.py", "sample.py", "benchmarks.speed", "experiments.adding"} <= seen


def test_generated_tables_are_the_committed_results():
    """Every generated block is what ``benchmarks.report`` makes of the committed JSON now, so a
    rerun cannot leave a page quoting an older run (``python -m benchmarks.report --write``)."""
    from benchmarks import report

    names = []
    for page in PAGES:
        for name, content in report.blocks(TEXT[page]):
            assert content == report.table(name), (
                f"{rel(page)}: the generated block {name!r} is out of date; run python -m benchmarks.report --write")
            names.append(name)
        assert TEXT[page].count("<!-- generated:") == TEXT[page].count("<!-- end generated -->"), rel(page)
    assert "speed-headline:speed-cpu-intel-avx512-amx" in [n for n, _ in report.blocks(TEXT[README])]
    # every CPU's speed results have their tables on the performance page
    performance = [n for n, _ in report.blocks(TEXT[ROOT / "docs" / "performance.md"])]
    for path in (ROOT / "benchmarks" / "results").glob("speed-*.json"):
        assert {f"speed-summary:{path.stem}", f"speed-peers:{path.stem}"} & set(performance), path.name


def test_readme_names_the_cpu_of_its_speed_table():
    from benchmarks import report

    out = report.load(report.BENCH / "speed-cpu-intel-avx512-amx.json")
    assert report.where(out, "speed-cpu-intel-avx512-amx") in TEXT[README]
    assert "(benchmarks/results/speed-cpu-intel-avx512-amx.md)" in TEXT[README]


def test_readme_is_one_screen_with_the_two_set_up_commands():
    size = len(TEXT[README].encode())
    assert size < README_LIMIT, f"README.md is {size:,} bytes; move detail to docs/ (limit {README_LIMIT:,})"
    bash = [b.strip() for b in fenced(TEXT[README], "bash")]
    assert INSTALL in bash and TEST in bash  # each its own block, copied into a terminal as it stands
    ci = [line.split("#")[0].strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert TEST in ci, "CI must run the README's test command"


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", TEXT[README]):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def missing_docs_tools() -> list[str]:
    missing = []
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


def test_docs_site_builds_strictly(tmp_path):
    if missing_docs_tools():
        pytest.skip(f"the docs tools are not installed ({', '.join(missing_docs_tools())}): "
                    'pip install mkdocs mkdocs-material "mkdocstrings[python]"')
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "api" / "core" / "index.html").is_file()  # mkdocstrings rendered the API
    assert (site / "benchmarks" / "results" / "speed-cpu-intel-avx512-amx" / "index.html").is_file()  # docs/hooks.py
