"""The byte ledger: what was sent, summed message by message.

One :class:`ByteLedger` per engine (or per DDP hook state) is charged by the engine's
:class:`~gradsparse.comm.channel.Channel`, never by the engine itself. Two kinds of count:

*Messages of the algorithm* (every engine, simulated or real; the papers' unit):

=====================  ==========================================================================
``uplink_bytes``       frames of the workers' messages, each message once (exact wire sizes)
``downlink_bytes``     frames delivered downward: the server's message once per receiving worker,
                       or, all-to-all, each worker's message once per other worker
``uplink_messages``,   how many of each
``downlink_messages``
=====================  ==========================================================================

*What this process handed to a real transport* (0 in the simulators):

=====================  ==========================================================================
``sent_bytes``         the bytes this process transmitted for the algorithm: its frames once per
                       destination, the size exchanges and message headers, dense all-reduces
                       at the bytes their ring algorithm transmits per rank. Comparable with the
                       kernel's TX counter of the process's network interface
``diagnostic_bytes``   bytes transmitted only so that rank 0 can record metrics (gradients and
                       memories of other ranks); not part of the algorithm
=====================  ==========================================================================

*What all ranks together transmit* (the question "what would P ranks cost"):

=========================  ======================================================================
``all_ranks_sent_bytes``   the ranks' ``sent_bytes`` summed over the ranks. The simulators
                           predict it from the messages' exact frame sizes with the rule of the
                           chosen collective (:func:`gradsparse.comm.collectives.collective_traffic`);
                           ``engine: torch`` sums what its ranks' channels were handed
                           (replicated mode; 0 with a parameter server on rank 0 and in the
                           asynchronous engines). Per rank and step: divide by P x steps
=========================  ======================================================================
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ByteLedger"]


@dataclass
class ByteLedger:
    """Bytes and messages sent (see the module docstring)."""

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    uplink_messages: int = 0
    downlink_messages: int = 0
    sent_bytes: int = 0
    diagnostic_bytes: int = 0
    all_ranks_sent_bytes: int = 0

    def add(self, uplink_bytes: int, downlink_bytes: int, uplink_messages: int, downlink_messages: int) -> None:
        """Charge messages of the algorithm."""
        self.uplink_bytes += int(uplink_bytes)
        self.downlink_bytes += int(downlink_bytes)
        self.uplink_messages += int(uplink_messages)
        self.downlink_messages += int(downlink_messages)

    def add_sent(self, nbytes: int, *, diagnostic: bool = False) -> None:
        """Charge bytes this process handed to its transport."""
        if diagnostic:
            self.diagnostic_bytes += int(nbytes)
        else:
            self.sent_bytes += int(nbytes)

    def add_all_ranks_sent(self, nbytes: int) -> None:
        """Charge bytes transmitted by all ranks together (see the module docstring)."""
        self.all_ranks_sent_bytes += int(nbytes)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, sd: dict) -> None:
        """Restore :meth:`state_dict` (a checkpoint written before the transport counters existed
        has none: they start at 0)."""
        for k in self.__dict__:
            setattr(self, k, int(sd.get(k, 0)))
