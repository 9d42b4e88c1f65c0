"""aioserver: an asyncio TCP server with echo and thank-you protocols.

Each client is served by a task started by `asyncio.start_server`; the server
stops by cancellation; uvloop is used when it is installed.
"""

from .loops import loop_factory
from .protocols import echo, thanks
from .runner import run
from .server import Server, Stats, serve

__all__ = [
    "Server",
    "Stats",
    "__version__",
    "echo",
    "loop_factory",
    "run",
    "serve",
    "thanks",
]

__version__ = "0.1.0"
