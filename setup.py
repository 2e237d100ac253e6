"""Build the compiled router, ``pushsvc._router``.

Compiler directives live here and nowhere else. ``build_ext`` takes two extra
switches: ``--with-coverage`` (line tracing, for ``Cython.Coverage``) and
``--with-annotate`` (HTML where Python calls on the hot path stand out). Setting
``PUSHSVC_DEBUG=1`` in the environment at build time compiles in debug checks.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CYTHON_RANGE = ((3, 1), (3, 4))


def _require_cython() -> None:
    try:
        import Cython
    except ImportError as exc:  # pragma: no cover - build environment problem
        raise RuntimeError(
            "pushsvc needs Cython to build its router: pip install 'Cython>=3.1,<3.4'"
        ) from exc
    version = tuple(int(part) for part in Cython.__version__.split(".")[:2])
    low, high = CYTHON_RANGE
    if not low <= version < high:
        raise RuntimeError(
            f"pushsvc needs Cython >=3.1,<3.4 to build its router, found {Cython.__version__}"
        )


class BuildExt(build_ext):
    user_options = build_ext.user_options + [
        ("with-coverage", None, "compile the router with line tracing"),
        ("with-annotate", None, "write Cython's annotated HTML beside the .pyx"),
    ]
    boolean_options = build_ext.boolean_options + ["with-coverage", "with-annotate"]

    def initialize_options(self) -> None:
        super().initialize_options()
        self.with_coverage = False
        self.with_annotate = False

    def finalize_options(self) -> None:
        _require_cython()
        from Cython.Build import cythonize

        directives = {
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "initializedcheck": False,
            "cdivision": True,
            "embedsignature": True,
        }
        macros = []
        if self.with_coverage or os.environ.get("PUSHSVC_COVERAGE") == "1":
            directives["linetrace"] = True
            macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
        if os.environ.get("PUSHSVC_DEBUG") == "1":
            macros.append(("PUSHSVC_DEBUG", "1"))
        for ext in self.distribution.ext_modules:
            ext.define_macros = list(ext.define_macros or []) + macros
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(self.with_annotate),
            force=bool(self.force),
        )
        super().finalize_options()


setup(
    ext_modules=[
        Extension(
            "pushsvc._router",
            ["pushsvc/_router.pyx"],
            extra_compile_args=["-O2"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
