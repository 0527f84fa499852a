"""fastbackend: a drop-in, much faster broker for the INGInious autograder.

``fastbackend.Backend(context, agent_addr, client_addr)`` with ``await backend.run()``
replaces ``inginious.backend.backend.Backend``; ``fastbackend serve`` replaces the
``inginious-backend`` script.
"""

from ._version import __version__
from .server import Backend

__all__ = ["Backend", "__version__"]
