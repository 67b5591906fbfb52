"""Build script: metadata lives in pyproject.toml; this file only adds the optional C++ extension.

The extension `vit_fast._C` (sources in csrc/) is built with torch's cpp_extension and ninja. It is
optional: set VIT_FAST_BUILD_EXT=0 to skip it, and a failed build only prints a warning, so the
package always installs and falls back to the Triton / reference paths.

torch must be importable at build time, so install with `pip install --no-build-isolation -e .`.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}

if os.environ.get("VIT_FAST_BUILD_EXT", "1") != "0":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # torch not importable: still install the pure-Python package
        print("vit_fast: torch not importable at build time; skipping the C++ extension", file=sys.stderr)
    else:

        class OptionalBuildExtension(BuildExtension):
            """Build the extension if possible; a failure leaves a working pure-Python install."""

            def run(self):
                try:
                    super().run()
                except Exception as err:
                    print(f"vit_fast: C++ extension not built ({err}); using fallbacks", file=sys.stderr)

        sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
        # -fno-trapping-math (as torch itself is built): without it GCC will not if-convert the
        # clamps and selects of the exp / erf polynomials for AVX2 (no mask registers), so the
        # x86-64-v3 clones of the softmax and GELU sweeps stayed scalar; it changes no result, only
        # what FP exception flags may be raised.
        extra_compile = ["-O3", "-fopenmp", "-std=c++20", "-fno-trapping-math"]
        if os.environ.get("VIT_FAST_NATIVE", "0") == "1":
            extra_compile.append("-march=native")
        ext_modules.append(
            CppExtension(
                name="vit_fast._C",
                sources=sources,
                extra_compile_args={"cxx": extra_compile},
                extra_link_args=["-fopenmp"],
            )
        )
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
