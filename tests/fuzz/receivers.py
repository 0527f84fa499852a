"""What the real peers do with a frame the broker sends them: their own loader, their key check.

The broker forwards pass-through values byte for byte, so every frame it sends must load
with the *receiver's* msgpack, or the peer raises in its receive loop (one bad client
frame could stop an agent).  The loaders:

* dialect 0.5 (INGInious 0.5 peers, msgpack 0.6): ``loads(b, encoding="utf8",
  use_list=False)``; in msgpack 1.x terms ``raw=False, use_list=False,
  strict_map_key=False`` (what tests/peers/msgpack_compat.py maps it to), and 0.6 has no
  timestamp type, so every negative ext type raises (``ExtType`` wants 0..127);
* dialect 0.9 (INGInious 0.7-0.9.2, msgpack 1.x): ``loads(b, use_list=False,
  strict_map_key=False)``, then ``cls(**fields)``: exactly the declared keys.
"""

from __future__ import annotations

from typing import Any

import msgpack

from fastbackend import protocol
from fastbackend.protocol import V05


def _ext(code: int, data: bytes) -> Any:
    return msgpack.ExtType(code, data)  # ValueError for a negative code, as msgpack 0.6


def _no_timestamps(value: Any) -> None:
    # msgpack 1.x reads ext -1 as a Timestamp before any ext_hook; msgpack 0.6 refused it.
    if isinstance(value, msgpack.Timestamp):
        raise ValueError("msgpack 0.6 has no timestamp type: ext -1 is refused")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_timestamps(k)
            _no_timestamps(v)
    elif isinstance(value, tuple):
        for v in value:
            _no_timestamps(v)


def receiver_loads(frame: bytes, dialect: int) -> Any:
    """Decode ``frame`` as a peer of ``dialect`` does; raises what that peer's loader raises."""
    if dialect == V05:
        message = msgpack.unpackb(frame, raw=False, use_list=False, strict_map_key=False, ext_hook=_ext)
        _no_timestamps(message)
        return message
    return msgpack.loads(frame, use_list=False, strict_map_key=False)


def check_backend_frame(frame: bytes, dialect: int) -> dict:
    """A frame the broker sends to a peer of ``dialect``: it loads, and its keys are exactly
    the declared fields of the message its type names, plus the type key."""
    message = receiver_loads(frame, dialect)
    d = protocol.DIALECTS[dialect]
    assert isinstance(message, dict), message
    msgtype = message.get(d.type_key)
    assert msgtype in d.backend_messages, (msgtype, message)
    assert set(message) == {*d.backend_messages[msgtype], d.type_key}, (msgtype, sorted(message))
    return message
