"""Choosing between the compiled and the pure-Python twin of a component, in one place.

``FASTBACKEND_NO_EXTENSIONS=1`` forces the pure-Python twins (``_<name>_py``).
Otherwise the compiled one (``_<name>_c``) is used; if it cannot be imported, a
warning is logged on ``fastbackend.<name>`` and the pure twin serves — and the test
suite fails, since it checks each selector's ``IMPL``: a broken build must be loud,
not merely slow.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType


def no_extensions() -> bool:
    return os.environ.get("FASTBACKEND_NO_EXTENSIONS", "") not in ("", "0")


def twin(name: str) -> tuple[ModuleType, str]:
    """The module implementing component ``name`` and ``"c"`` or ``"py"``."""
    if not no_extensions():
        try:
            return importlib.import_module(f"fastbackend._{name}_c"), "c"
        # A missing build raises ImportError; a stale one (built against an older .pxd of
        # another twin) raises TypeError, AttributeError or ValueError as Cython checks the
        # C signatures and struct sizes it imports.  Either way: loud, then the pure twin.
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            logging.getLogger(f"fastbackend.{name}").warning(
                "fastbackend._%s_c failed to import (%s): using the much slower pure-Python twin; "
                "build the extensions, or set FASTBACKEND_NO_EXTENSIONS=1 to choose it", name, exc,
            )
    return importlib.import_module(f"fastbackend._{name}_py"), "py"
