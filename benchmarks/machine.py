"""What a benchmark ran on: CPU model, cores, the instruction-set flags that decide matmul speed,
accelerators, library versions; and a short tag for result file names (results from different
CPUs live side by side); ``write_results`` writes a run's JSON and markdown under that name.
Importing it imports neither JAX nor lstm_jax (the device check's driver process needs neither)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")


def cpu_model() -> str:
    from lstm_jax.core import host  # the library reads /proc/cpuinfo for its own cache keys

    return host.cpu_model()


def cpu_flags() -> dict[str, bool]:
    from lstm_jax.core import host

    flags = host.cpu_flags()
    return {f: f in flags for f in FLAGS}


def describe() -> dict:
    import jax

    info = dict(cpu=cpu_model(), cores=os.cpu_count(), flags=cpu_flags(), jax=jax.__version__,
                backend=jax.default_backend(), devices=[str(d) for d in jax.devices()])
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except ImportError:
        pass
    return info


def cpu_tag() -> str:
    """e.g. 'intel-avx512-amx', 'amd-avx2': the CPU family, as it bears on speed."""
    model, flags = cpu_model().lower(), cpu_flags()
    vendor = "intel" if "intel" in model else "amd" if "amd" in model else platform.machine()
    isa = "avx512" if flags["avx512f"] else "avx2" if flags["avx2"] else "base"
    return f"{vendor}-{isa}" + ("-amx" if flags["amx_bf16"] else "")


def describe_line(info: dict | str) -> str:
    """One line naming the machine (older result files hold it as a plain string already)."""
    if isinstance(info, str):
        return info
    have = ", ".join(f for f, on in info["flags"].items() if on) or "none of " + ", ".join(FLAGS)
    return f"{info['cpu']}, {info['cores']} cores ({have}); jax {info['jax']}, backend {info['backend']}"


def write_results(stem: str, out: dict, markdown: str, folder: Path = RESULTS) -> None:
    """A run's results: ``<folder>/<stem>.json`` (``out``) and ``<stem>.md`` (``markdown``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (folder / f"{stem}.md").write_text(markdown)
