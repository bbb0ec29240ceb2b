"""Test support for orchestrator authors: a fake TGI server and a scripted adapter.

``FakeTgiServer`` imitates a real TGI of a chosen version on a local socket
(framing, validation, OpenAI routes, faults, TLS); ``MockAdapter`` implements
the worker contract with scripted answers and no sockets at all.
"""

from .fake_engine import Fault
from .fake_server import Disconnect, FakeTgiServer, RecordedRequest
from .mock_adapter import MockAdapter, MockFault

__all__ = ["Disconnect", "FakeTgiServer", "Fault", "MockAdapter", "MockFault", "RecordedRequest"]
