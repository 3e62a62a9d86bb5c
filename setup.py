"""Builds the optional native CPU kernel, ``adamw_jax._native_lib`` (everything else is in pyproject.toml).

The kernel is C++ against the XLA FFI headers that jaxlib ships. If it cannot
be built (no compiler, no headers), the install still succeeds: the reason is
written to ``adamw_jax/_native_lib.error`` and the package runs its pure-JAX
kernel, saying so once when it is imported.
"""

from __future__ import annotations

import importlib.util
import pathlib
import traceback

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ERROR_FILE = "_native_lib.error"
FLAGS = [
  "-std=c++17",
  "-O3",
  # The kernel's roundings are written out (std::fma where torch fuses):
  # no contraction, no value-changing math; errno-free sqrt vectorizes.
  "-ffp-contract=off",
  "-fno-fast-math",
  "-fno-math-errno",
  "-Wno-return-type",
]


def _ffi_include_dir() -> str:
  """jaxlib's headers (``jax.ffi.include_dir()``), found without importing jaxlib."""
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("jaxlib is not installed in the build environment")
  include = pathlib.Path(next(iter(spec.submodule_search_locations))) / "include"
  if not (include / "xla" / "ffi" / "api" / "ffi.h").exists():
    raise RuntimeError(f"jaxlib has no XLA FFI headers under {include}")
  return str(include)


class OptionalBuildExt(build_ext):
  """build_ext that records a failure instead of failing the install."""

  def build_extension(self, ext: Extension) -> None:
    package_dir = pathlib.Path(self.get_ext_fullpath(ext.name)).parent
    error_file = package_dir / ERROR_FILE
    try:
      ext.include_dirs.append(_ffi_include_dir())
      super().build_extension(ext)
      error_file.unlink(missing_ok=True)
    except Exception as e:
      package_dir.mkdir(parents=True, exist_ok=True)
      error_file.write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")
      print(
        f"adamw_jax: the native kernel was not built ({type(e).__name__}: {e}); "
        "the pure-JAX kernel will be used."
      )


setup(
  ext_modules=[
    Extension(
      "adamw_jax._native_lib",
      ["adamw_jax/_native.cc", "adamw_jax/_native_lowmem.cc"],
      depends=[
        "adamw_jax/_native_common.h",
        "adamw_jax/_native_lowp.h",
        "adamw_jax/_native_quantize.h",
      ],
      extra_compile_args=FLAGS,
      language="c++",
    )
  ],
  cmdclass={"build_ext": OptionalBuildExt},
)
