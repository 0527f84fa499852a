"""Run the real INGInious 0.5 peers on msgpack >= 1.0.

Why an adapter is needed
------------------------
The conformance tests drive fastbackend with the *real* client and agent classes of
INGInious 0.5 (``pip install --no-deps INGInious==0.5``), so that they prove the broker
speaks the protocol those peers expect, not merely our reading of it.  Those classes
serialise every message in one place, ``inginious.common.message_meta``, which calls::

    msgpack.dumps(fields, encoding="utf8", use_bin_type=True)
    msgpack.loads(frame, encoding="utf8", use_list=False)

The ``encoding`` keyword existed up to msgpack 0.6 and was removed in msgpack 1.0, which
fastbackend and its tests use.  Installing msgpack 0.6 next to fastbackend is not an
option (one interpreter, one msgpack), and it has no wheel for current CPython anyway.

What the adapter does
---------------------
:func:`install` replaces the ``msgpack`` name *inside* ``inginious.common.message_meta``
(and nowhere else) with :data:`MSGPACK_06`, a tiny object whose ``dumps``/``loads`` accept
the 0.6 keywords and map them onto msgpack 1.x:

* packing: ``encoding="utf8"`` was already how 0.6 packed ``str``; msgpack 1.x always
  packs ``str`` as UTF-8, so the keyword is dropped and ``packb(d, use_bin_type=True)``
  produces exactly the bytes 0.6 produced;
* unpacking: ``encoding="utf8"`` meant "decode msgpack str as UTF-8", which msgpack 1.x
  spells ``raw=False``.  0.6 also accepted any map key type, so ``strict_map_key=False``
  keeps that.  Without ``encoding``, 0.6 returned raw ``bytes`` (``raw=True``).

Nothing else in the peers changes: the same classes, message checks and socket code run,
and the bytes on the wire are those of an INGInious 0.5 deployment.  The stock backend
used as a reference (``stock_backend.py``) goes through the same module, so it is
adapted by the same call.
"""

from __future__ import annotations

from typing import Any

import msgpack

_UTF8 = {"utf8", "utf-8", "UTF-8", "UTF8"}


def _unpack_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    encoding = kwargs.pop("encoding", None)
    if encoding is not None and encoding not in _UTF8:
        raise ValueError(f"the 0.6 adapter only supports encoding='utf8', got {encoding!r}")
    kwargs.setdefault("raw", encoding is None)
    kwargs.setdefault("strict_map_key", False)
    return kwargs


def _pack_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    encoding = kwargs.pop("encoding", None)
    if encoding is not None and encoding not in _UTF8:
        raise ValueError(f"the 0.6 adapter only supports encoding='utf8', got {encoding!r}")
    return kwargs


class Msgpack06:
    """The part of the msgpack 0.6 API that INGInious 0.5 uses, on top of msgpack 1.x."""

    @staticmethod
    def packb(obj: Any, **kwargs: Any) -> bytes:
        """``msgpack.packb`` accepting (and dropping) ``encoding="utf8"``."""
        return msgpack.packb(obj, **_pack_kwargs(kwargs))

    @staticmethod
    def unpackb(data: bytes, **kwargs: Any) -> Any:
        """``msgpack.unpackb`` with ``encoding="utf8"`` mapped to ``raw=False``."""
        return msgpack.unpackb(data, **_unpack_kwargs(kwargs))

    dumps = packb
    loads = unpackb


#: The object put in place of ``msgpack`` inside ``inginious.common.message_meta``.
MSGPACK_06 = Msgpack06()


def install() -> None:
    """Make ``inginious.common.message_meta`` use the 0.6 adapter (idempotent)."""
    from inginious.common import message_meta

    message_meta.msgpack = MSGPACK_06
