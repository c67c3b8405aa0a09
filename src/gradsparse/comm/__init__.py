"""The communication seam: channels that deliver the algorithm's messages and the one ledger
they charge (see :mod:`gradsparse.comm.channel`)."""

from .channel import Channel, SimulatedRounds, VirtualTimeNetwork
from .ledger import ByteLedger

__all__ = ["ByteLedger", "Channel", "SimulatedRounds", "VirtualTimeNetwork", "CollectiveChannel",
           "PointToPointChannel"]


def __getattr__(name):  # the torch.distributed channels, imported when first used
    if name == "CollectiveChannel":
        from .collective import CollectiveChannel

        return CollectiveChannel
    if name == "PointToPointChannel":
        from .point_to_point import PointToPointChannel

        return PointToPointChannel
    raise AttributeError(name)
