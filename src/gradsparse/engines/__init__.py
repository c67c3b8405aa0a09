"""Engines: what runs an algorithm (see :mod:`.base` for the interface).

``ENGINES`` maps the config key ``engine`` to its class.
"""

from .async_sim import AsyncSimulator
from .base import ByteLedger, Engine, WorkerData
from .loop_sim import LoopSimulator
from .sync_sim import SyncSimulator
from .synchronous import StepRecord, SynchronousEngine
from .torch_async import TorchAsyncEngine
from .torch_dist import TorchDistEngine

#: the one table of engines
ENGINES = {cls.name: cls for cls in (SyncSimulator, LoopSimulator, AsyncSimulator, TorchDistEngine, TorchAsyncEngine)}

__all__ = ["ENGINES", "Engine", "ByteLedger", "WorkerData", "SynchronousEngine", "StepRecord", "SyncSimulator", "LoopSimulator", "AsyncSimulator", "TorchDistEngine", "TorchAsyncEngine"]
