"""Builds the optional oneDNN LSTM extension (``lstm_jax/kernels/csrc/onednn_lstm.cc``) during ``pip install``.

Everything else is in pyproject.toml. The extension needs a C++ compiler, jaxlib's XLA FFI headers
and the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels (build requirements on Linux
x86-64). If any is missing the build prints one line and the install goes on: ``lstm_jax`` then
runs its pure-JAX layers (``lstm_jax.onednn.available()`` is False and ``unavailable_reason()`` says why).

Beside the extension the build writes ``_onednn_lstm.build.json`` with the jaxlib whose FFI headers
it was compiled against: XLA accepts handlers built with older headers, not newer ones, so the
loader refuses the extension under an older jaxlib instead of letting it stop JAX's CPU backend.
"""

import importlib.metadata
import json
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _wheel_file(dist: str, suffix: str) -> Path:
    """The file whose path ends with ``suffix`` among the files installed by the wheel ``dist``."""
    wheel = importlib.metadata.distribution(dist)
    for f in wheel.files or ():
        path = Path(wheel.locate_file(f)).resolve()
        if path.as_posix().endswith(suffix):
            return path
    raise FileNotFoundError(f"{suffix} is not in the {dist} wheel")


class OptionalBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            import jaxlib

            ext.include_dirs += [str(Path(jaxlib.__file__).parent / "include"),
                                 str(_wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp").parents[2])]
            ext.library_dirs += [str(_wheel_file("onednn-cpu-gomp", "lib/libdnnl.so.3").parent)]
            super().build_extension(ext)
            built = Path(self.get_ext_fullpath(ext.name))
            built.with_name("_onednn_lstm.build.json").write_text(json.dumps({"jaxlib": jaxlib.__version__}) + "\n")
        except Exception as e:  # optional: never fail the install over it
            print(f"lstm_jax: the oneDNN extension was not built ({type(e).__name__}: {e}); "
                  f"the pure-JAX layers will be used.")


setup(
    ext_modules=[Extension(
        "lstm_jax.kernels._onednn_lstm",
        sources=["lstm_jax/kernels/csrc/onednn_lstm.cc"],
        language="c++",
        extra_compile_args=["-std=c++17", "-O2", "-fopenmp", "-Wno-attributes",
                            "-Wno-return-type"],
        extra_link_args=["-fopenmp", "-l:libdnnl.so.3"],
        optional=True,
    )],
    cmdclass={"build_ext": OptionalBuildExt},
)
