from .fake_engine import Fault
from .fake_server import Disconnect, FakeTgiServer, RecordedRequest

__all__ = ["Disconnect", "FakeTgiServer", "Fault", "RecordedRequest"]
