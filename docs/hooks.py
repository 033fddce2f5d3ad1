"""mkdocs hooks: the committed result files join the site.

The pages link to result files as GitHub shows them, relative to ``docs/``
(``../benchmarks/results/speed-cpu-intel-avx512-amx.md``). ``on_files`` adds every file of
``benchmarks/results/`` and ``experiments/results/`` to the site under the same folder names
(the ``.md`` tables become pages), and ``on_page_markdown`` drops the ``../`` that leaves
``docs/``, so the same links work in the built site.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("benchmarks/results", "experiments/results")


def on_files(files, config):
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).iterdir()):
            if path.is_file() and path.suffix in (".md", ".png", ".json"):
                files.append(File.generated(config, f"{folder}/{path.name}", abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # a page in docs/api/ is one folder down
    outside = re.escape("../" * (depth + 1))
    return re.sub(rf"(\]\(|src=\"){outside}({'|'.join(FOLDERS)})/", rf"\1{'../' * depth}\2/", markdown)
