"""Scan incoming frames and splice outgoing ones, without decoding whole messages.

This module picks the implementation: the compiled ``_wire_c`` unless
``FASTBACKEND_NO_EXTENSIONS=1`` is set, in which case the pure-Python twin ``_wire_py``
(the readable statement of the algorithm).  If the compiled module was expected but
fails to import, a warning is logged and ``IMPL`` says ``"py"``; the test suite fails
in that case, so a broken build never runs slowly unnoticed.

Wire schema
===========

A frame is exactly one msgpack object (nothing after it, at most
``protocol.MAX_FRAME_SIZE`` bytes): a map whose keys are all str, none repeated, and
whose key set is exactly ``"type"`` plus the declared fields of the message that
``type`` names (``protocol.CLIENT_MESSAGES`` / ``protocol.AGENT_MESSAGES``).

msgpack formats read (big-endian lengths; any size class is accepted, the scanner
never assumes the shortest encoding was chosen)::

    lead byte   format         followed by
    00-7f       positive fixint  -
    80-8f       fixmap         (lead & 0x0f) key/value pairs
    90-9f       fixarray       (lead & 0x0f) values
    a0-bf       fixstr         (lead & 0x1f) bytes of UTF-8
    c0          nil            -
    c1          (never used)   -> WireError
    c2, c3      false, true    -
    c4, c5, c6  bin8/16/32     1/2/4-byte length, then the bytes
    c7, c8, c9  ext8/16/32     1/2/4-byte length, 1 type byte, then the data
    ca, cb      float32/64     4/8 bytes
    cc-cf       uint8/16/32/64 1/2/4/8 bytes
    d0-d3       int8/16/32/64  1/2/4/8 bytes, two's complement
    d4-d8       fixext1..16    1 type byte, then 1/2/4/8/16 bytes
    d9, da, db  str8/16/32     1/2/4-byte length, then the bytes
    dc, dd      array16/32     2/4-byte count, then the values
    de, df      map16/32       2/4-byte count, then the pairs
    e0-ff       negative fixint -

Messages, per dialect (field: kind).  Kinds: ``str`` = str of valid UTF-8; ``int`` =
any integer format; ``uint`` = integer >= 0; ``map`` = a map, contents any; ``any`` =
pass-through, checked for well-formedness only (nested containers at most
``MAX_DEPTH`` deep, the message's map counting as one) and copied byte for byte.  The
type key is ``type`` in 0.5 and ``@type`` in 0.9; a frame holding the *other* dialect's
type key raises ``WrongDialect`` (the broker then reads it with that dialect's tables)::

    0.5 client -> backend
      client_hello      name: str
      client_new_job    job_id: str, course_id: str, task_id: str, inputdata: any,
                        environment: str, enable_network: any, time_limit: int,
                        hard_time_limit: int, mem_limit: int, debug: any, launcher: str
      client_kill_job   job_id: str
      client_get_queue  (no field)
      ping              (no field)
    0.5 agent -> backend
      agent_hello          friendly_name: str, available_job_slots: uint, available_containers: map
      agent_job_started    job_id: [bin client_identity (1..255 bytes), str job id]
      agent_job_done       job_id: as above, result, grade, problems, tests, custom,
                           archive, stdout, stderr: any
      agent_job_ssh_debug  job_id: as above, host, port, password: any
      pong                 (no field)

    0.9 client -> backend
      ClientHello       name: str
      ClientNewJob      job_id: str, priority: int, course_id: str, task_id: str,
                        task_problems: any, inputdata: any, environment_type: str,
                        environment: str, environment_parameters: any, debug: any, launcher: str
      ClientKillJob     job_id: str
      ClientGetQueue    (no field)
      Ping              (no field)
    0.9 agent -> backend
      AgentHello        friendly_name: str, available_job_slots: uint, available_environments: map
      AgentJobStarted   job_id: str
      AgentJobDone      job_id: str, result, grade, problems, tests, custom, state,
                        archive, stdout, stderr: any
      AgentJobSSHDebug  job_id: str, host, port, user, password: any
      Pong              (no field)

Spliced frames (``protocol.Splice``): the incoming entries, in the incoming order, with
the type key's value replaced and::

    0.5 backend_new_job        job_id -> [bin client_identity, the client's job_id value
                               as it was encoded]; launcher removed
    0.5 backend_job_done       job_id -> the client's job id as a str
    0.5 backend_job_ssh_debug  the same
    0.9 BackendNewJob          priority and launcher removed
    0.9 BackendJobDone         (only @type changes)
    0.9 BackendJobSSHDebug     (only @type changes)
    backend_job_started / BackendJobStarted  {type key, job_id: str}, encoded here

Only the top-level map header and the replaced values are written anew (in the shortest form).

API (identical in both implementations; ``dialect`` is a ``protocol`` tag, 0.5 by
default): ``scan_client``, ``queue_fields``, ``submission_state``, ``splice_new_job``,
``scan_agent``, ``splice_job_done``, ``splice_ssh_debug``, ``job_started``, ``job_key``;
see their docstrings.  The compiled module also offers a C-level API for the broker
(``_wire_c.pxd``).
"""

from __future__ import annotations

from fastbackend._select import twin
from fastbackend.protocol import V09, WireError, WrongDialect

__all__ = [
    "IMPL", "WireError", "WrongDialect", "scan_client", "queue_fields", "submission_state",
    "splice_new_job", "scan_agent", "splice_job_done", "splice_ssh_debug", "job_started", "job_key",
    "key_dialect", "key_client", "key_job_id",
]

_impl, IMPL = twin("wire")

job_key = _impl.job_key
job_started = _impl.job_started
queue_fields = _impl.queue_fields
scan_agent = _impl.scan_agent
scan_client = _impl.scan_client
splice_job_done = _impl.splice_job_done
splice_new_job = _impl.splice_new_job
splice_ssh_debug = _impl.splice_ssh_debug
submission_state = _impl.submission_state


def key_dialect(key: bytes) -> int:
    """The dialect of a ``job_key``: its first byte is 0 for 0.9 (a 0.5 identity is never empty)."""
    return V09 if key[0] == 0 else 0


def key_client(key: bytes) -> bytes:
    """The client identity inside a 0.5 ``job_key``."""
    return key[1 : 1 + key[0]]


def key_job_id(key: bytes) -> str:
    """The client's job id inside a ``job_key`` of either dialect."""
    return key[1 + key[0] :].decode()
