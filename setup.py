"""Build the compiled twins of fastbackend's hot-path modules.

Build switches are read once, here, from the environment:

* ``FASTBACKEND_DEBUG=1``   compile the invariant checks in (``FB_DEBUG``), as CI does;
* ``FASTBACKEND_NO_EXTENSIONS=1``  build nothing: the pure-Python twins are used;
* ``FASTBACKEND_EXTS=_wire_c,_sched_c``  (development) build only the named modules.

Packaging: the version is ``fastbackend/_version.py`` (pyproject reads it); MANIFEST.in
puts the Cython sources in the sdist, and neither the sdist nor the wheels carry the
generated C.  ``FASTBACKEND_NO_EXTENSIONS=1 pip wheel --no-deps .`` builds the
pure-Python wheel (``py3-none-any``).
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("FASTBACKEND_DEBUG", "") not in ("", "0")
NO_EXTENSIONS = os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0")
ONLY = {name for name in os.environ.get("FASTBACKEND_EXTS", "").split(",") if name}

DIRECTIVES = {
    "language_level": 3,
    "embedsignature": True,
    # Checks are switched off per function, where a test covers the indices.
    "boundscheck": True,
    "wraparound": True,
}


#: Commands that only describe or pack the sources: they need no generated C.
METADATA_ONLY = {"sdist", "egg_info", "dist_info", "--version", "--name"}


def extensions():
    if NO_EXTENSIONS:
        return []
    commands = {arg for arg in sys.argv[1:] if not arg.startswith("-") or arg in METADATA_ONLY}
    if commands and commands <= METADATA_ONLY:
        return []
    from Cython.Build import cythonize

    modules = []
    for pyx in sorted((HERE / "fastbackend").glob("_*_c.pyx")):
        name = pyx.stem
        if ONLY and name not in ONLY:
            continue
        modules.append(
            Extension(
                f"fastbackend.{name}",
                [f"fastbackend/{pyx.name}"],
                define_macros=[("FB_DEBUG", "1" if DEBUG else "0")],
                extra_compile_args=["-O2"] + (["-g", "-O1"] if DEBUG else []),
                libraries=["dl"],
            )
        )
    return cythonize(modules, compiler_directives=DIRECTIVES, quiet=True)


setup(ext_modules=extensions())
