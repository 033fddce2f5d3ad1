"""Every Python block of the README runs as written, on its own, in a fresh interpreter."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# blocks nested in list items are indented
BLOCKS = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)]


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_on_its_own(index, tmp_path):
    code = BLOCKS[index]
    if "import torch" in code:
        pytest.importorskip("torch")
    # a fresh interpreter, started outside the checkout: no imports lent by another block or by pytest
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README block {index} failed:\n{code}\n{proc.stderr[-3000:]}"


def test_readme_speed_tables_are_the_committed_runs():
    """The README's speed tables are ``benchmarks/speed.py``'s own (``summary_tables``) for the
    result file the README links, so a rerun cannot leave the README quoting an older run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    for name in re.findall(r"\(benchmarks/results/(speed-[\w-]+)\.md\)", README):
        rows = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())["rows"]
        if not any(r["impl"].endswith("synchronous dispatch") for r in rows if "error" not in r):
            continue  # a run from before these tables (the AMD EPYC's), quoted by hand
        for table in "\n".join(speed.summary_tables(rows)).split("\n\n"):
            assert table in README, f"README lacks this table of {name}.json:\n{table}"
