"""Test peers for fastbackend: the real INGInious 0.5 client/agent, raw sockets, broker processes.

Importing this package installs :mod:`peers.msgpack_compat` (the msgpack 0.6 adapter the
real 0.5 peers need on msgpack >= 1.0) before any real peer is used.

* :mod:`peers.broker` -- start/stop a broker subprocess (fastbackend or stock), read its log;
* :mod:`peers.real`   -- the real Client and a scripted subclass of the real Agent;
* :mod:`peers.raw`    -- raw DEALER peers for inputs the real ones cannot produce;
* :mod:`peers.stock_backend` -- the stock INGInious 0.5 backend, as a reference broker.
"""

from .msgpack_compat import install as _install_msgpack_compat

_install_msgpack_compat()
