"""The DDP hook's state: :class:`SparsifiedState` (the algorithm, one segment per parameter with
its memory, momentum and compressor state keyed by the parameter's name, the ledger, the step
counter, checkpoints of plain tensors) and what builds it (the model's layout, a compressor's
share of one parameter). :mod:`gradsparse.distributed.ddp_hook` holds the hook that reads it;
both are importable as :mod:`gradsparse.ddp`."""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..algorithm import Algorithm, ServerState, WorkerState
from ..comm import ByteLedger, CollectiveChannel
from ..comm import collectives as coll
from ..compressors import ApproximateTopK, BudgetThreshold, Compressor, RandomK, TopK
from ..divergence import all_finite
from ..segments import Layout, SegmentedTensor

__all__ = ["SparsifiedState", "layout_of", "segment_compressor", "NonFiniteGradient"]


class NonFiniteGradient(FloatingPointError):
    """Raised on every rank when any rank's bucket held a non-finite gradient or message
    (``on_nonfinite: stop``)."""


def _named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {n: p for n, p in inner.named_parameters() if p.requires_grad}


def layout_of(model: torch.nn.Module) -> Layout:
    """The model's segments (trainable parameters in registration order; a DDP wrapper's
    ``module.`` prefix is not part of the names)."""
    return Layout.of(_named_parameters(model))


def segment_compressor(compressor: Compressor, layout: Layout, index: int) -> Compressor:
    """The model-wide compressor restricted to segment ``index`` of ``layout``: what the
    simulator's ``scope: layerwise`` applies to that segment alone (a byte budget: the segment's
    share, see the module docstring)."""
    d, d_l = layout.d, layout.sizes[index]
    if isinstance(compressor, TopK):
        if compressor.scope != "layerwise":
            raise ValueError(
                "the DDP hook compresses each parameter alone: top-k needs scope 'layerwise' "
                "(scope 'entire' runs in whole-model mode, whole_model=True)"
            )
        _, _, k_l = compressor.segment_ks(d)[index]
        return TopK(k=k_l)
    if isinstance(compressor, (RandomK, ApproximateTopK)):
        # one random stream per segment: the segment index shifts the seed
        amount = {"density": compressor.density} if compressor.density is not None else {
            "k": min(d_l, max(1, round(compressor.k * d_l / d)))}
        if isinstance(compressor, RandomK):
            return RandomK(seed=compressor.seed + 1_000_003 * index, scale=compressor.scale,
                           shared_support=compressor.shared_support, **amount)
        return ApproximateTopK(sample_fraction=compressor.sample_fraction, exact=compressor.exact,
                               seed=compressor.seed + 1_000_003 * index, **amount)
    if isinstance(compressor, BudgetThreshold):
        return _segment_budget(compressor, layout, index)
    return compressor  # identity, hard-threshold and other element-wise compressors


def _segment_budget(budget: BudgetThreshold, layout: Layout, index: int) -> BudgetThreshold:
    """Parameter ``index``'s share of a model-wide budget: T empty frames of its own plus the
    share d_l / d of what the model's empty frames leave (bytes), or the same density."""
    if budget.steps is None:
        raise ValueError("budget_threshold in the DDP hook needs steps (the number of training steps): "
                         "BudgetThreshold(..., steps=T)")
    common = dict(steps=budget.steps, threshold=budget.threshold, gain=budget.gain, gain_floor=budget.gain_floor,
                  burst=budget.burst)
    if not budget.bytes_mode:
        share = BudgetThreshold(density=budget.density, **common)
    else:
        empties = []
        for size in layout.sizes:
            probe = BudgetThreshold(budget_bytes=0, **common)
            probe.value_bytes = budget.value_bytes
            empties.append(probe._sizes(size)[0])
        floor = budget.steps * sum(empties)
        if budget.budget_bytes < floor:
            raise ValueError(f"budget_bytes = {budget.budget_bytes} is below the {budget.steps} steps x "
                             f"{len(empties)} parameters' empty frames ({floor} bytes) that the hook's per-parameter "
                             "messages cost; raise the budget or use whole_model=True (one message per step)")
        rest = budget.budget_bytes - floor
        mine = budget.steps * empties[index] + (rest * layout.sizes[index]) // layout.d
        share = BudgetThreshold(budget_bytes=mine, **common)
    share.bind_run(budget.steps, budget.value_dtype)
    return share


def _check_collective(algorithm: Algorithm, collective: str) -> None:
    """What each collective needs of the algorithm (one line naming what to change)."""
    kind = algorithm.topology.kind
    if collective == "sharded" and kind == "bidirectional":
        down = algorithm.topology.down_compressor
        if not isinstance(down, TopK) or down.density is None:
            raise ValueError("collective 'sharded' with topology bidirectional: every rank compresses its own slice of "
                             "the sum, so the down compressor must be TopK(density=RHO), got " + down.describe())
    elif kind != "all_to_all":
        raise ValueError(f"the DDP hook runs topology all_to_all (or bidirectional with collective 'sharded'), got "
                         f"{kind!r} (parameter servers: engine 'torch' with one more process)")
    if collective != "allgather" and algorithm.momentum.side == "server":
        raise ValueError(f"collective {collective!r} delivers the sum itself and the hook keeps no server momentum "
                         "with it: use momentum on the workers ('update') or collective 'allgather'")
    if collective == "allreduce" and not (isinstance(algorithm.compressor, RandomK) and algorithm.compressor.shared_support):
        raise ValueError("collective 'allreduce' sums the values of one support shared by every rank: it needs "
                         f"RandomK(..., shared_support=True), got {algorithm.compressor.describe()}")


@dataclass
class _Segment:
    name: str
    alg: Algorithm
    layout: Layout
    worker: WorkerState
    server: ServerState


class SparsifiedState:
    """State of :func:`hook`: the algorithm, the step counter, the byte ledger, and per parameter
    name the error-feedback memory, momentum and compressor state.

    model:          the DDP model (or its module): trainable parameters give the names
    algorithm:      an :class:`~gradsparse.algorithm.Algorithm` with topology ``all_to_all``
                    (its ``value_dtype`` is the dtype the values travel in; its ``on_nonfinite``
                    the policy for NaN and infinities)
    lr:             the step size alpha_t the algorithm uses (a number or ``fn(step) -> float``);
                    ``ef``/``ef-scaled``/``none`` put it inside the messages, give the
                    optimizer the same value
    warmup_steps:   this many first steps are a dense all-reduce (no compression, no memory)
    dense_fallback: all-reduce the densified bucket when the sparse exchange would send more
                    (default True; see the module docstring)
    memory_dtype:   dtype of memories and momentum (default: float32 for fp16/bf16 parameters,
                    else the parameter's dtype)
    process_group:  the group to communicate in (default: the world)
    whole_model:    compress the whole model at the last bucket (default: True for top-k
                    ``scope: entire`` and for ``budget_threshold``, else False)
    collective:     ``allgather`` (default), ``sharded`` or ``allreduce`` (see the module
                    docstring and :mod:`gradsparse.comm.collectives`)

    State besides the memories: ``shard_memory`` (``sharded`` + ``bidirectional``: this rank's
    downlink memory of its slice of each parameter, by name; in the checkpoint).

    Counters: ``step``, ``ledger`` (``sent_bytes``, ``uplink_bytes``, ...; ``uplink_bytes`` and
    ``sent_bytes`` are also attributes), ``dense_bytes`` (what DDP's all-reduce of the same
    buckets would send), ``messages``, ``dense_fallbacks``, ``skipped_messages``.
    """

    def __init__(self, model: torch.nn.Module, algorithm: Algorithm, *, lr=1.0, warmup_steps: int = 0,
                 dense_fallback: bool = True, memory_dtype: torch.dtype | None = None, process_group=None,
                 whole_model: bool | None = None, collective: str = "allgather") -> None:
        self.collective = coll.check_collective(collective)
        _check_collective(algorithm, collective)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if not callable(lr) and not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number or a function of the step, got {lr!r}")
        params = _named_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameters")
        self.algorithm = algorithm
        self.layout = Layout.of(params)
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.dense_fallback = bool(dense_fallback)
        self.memory_dtype = memory_dtype
        self.process_group = process_group
        self.step = 0
        self.ledger = ByteLedger()
        self.dense_bytes = 0
        self.messages = 0
        self.dense_fallbacks = 0
        #: ``sharded`` + ``bidirectional``: this rank's downlink memory of its slice of each
        #: parameter (by name; created at the first step, when the world size is known)
        self.shard_memory: dict[str, torch.Tensor] = {}
        self._channel: CollectiveChannel | None = None
        self._bind(params)
        self.segments: dict[str, _Segment] = {}
        c = algorithm.compressor
        default_whole = (isinstance(c, TopK) and c.scope == "entire") or isinstance(c, BudgetThreshold)
        self.whole_model = default_whole if whole_model is None else bool(whole_model)
        if not self.whole_model:
            for i, (name, p) in enumerate(params.items()):
                self.segments[name] = self._new_segment(i, name, p)
            return
        # whole-model mode: one state over the layout; each name's entry is a view into it
        first = next(iter(params.values()))
        dtype, device = self._dtype_for(first), first.device
        if algorithm.weight_decay:
            raise ValueError("whole-model mode does not apply weight decay inside the algorithm; use the optimizer's")
        self._whole_worker = algorithm.init_worker_state(self.layout, 1, dtype)
        self._whole_server = algorithm.init_server_state(self.layout, dtype)
        for part in (self._whole_worker.memory, self._whole_worker.momentum, self._whole_server.momentum):
            if part is not None:
                part.flat = part.flat.to(device)
        self._bounds = {n: (a, b) for n, a, b in self.layout.bounds()}
        self._grad_full = torch.zeros(self.layout.d, dtype=dtype, device=device)
        self._pending: list = []

        def view(st, name):
            if st is None:
                return None
            a, b = self._bounds[name]
            return SegmentedTensor(Layout.flat(b - a, name), st.flat[..., a:b])

        for name in params:
            worker = WorkerState(view(self._whole_worker.memory, name), view(self._whole_worker.momentum, name), None)
            self.segments[name] = _Segment(name, algorithm, Layout.flat(self._bounds[name][1] - self._bounds[name][0], name),
                                           worker, ServerState(view(self._whole_server.momentum, name), None))

    # ---- construction -----------------------------------------------------------------------
    def _bind(self, params: dict) -> None:
        self._names = {id(p): n for n, p in params.items()}
        self._names_by_ptr = {p.data_ptr(): n for n, p in params.items()}

    def _dtype_for(self, p: torch.Tensor) -> torch.dtype:
        if self.memory_dtype is not None:
            return self.memory_dtype
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _new_segment(self, index: int, name: str, p: torch.Tensor) -> _Segment:
        a = self.algorithm
        alg = Algorithm(compressor=segment_compressor(a.compressor, self.layout, index), feedback=a.feedback,
                        momentum=a.momentum, topology="all_to_all", weight_decay=a.weight_decay,
                        value_dtype=a.value_dtype, staleness=a.staleness, on_nonfinite=a.on_nonfinite)
        layout = Layout.flat(p.numel(), name)
        dtype = self._dtype_for(p)
        worker = alg.init_worker_state(layout, 1, dtype)
        server = alg.init_server_state(layout, dtype)
        for part in (worker.memory, worker.momentum, server.momentum):
            if part is not None:
                part.flat = part.flat.to(p.device)
        return _Segment(name, alg, layout, worker, server)

    def name_of(self, p: torch.Tensor) -> str:
        name = self._names.get(id(p)) or self._names_by_ptr.get(p.data_ptr())
        if name is None:
            raise KeyError("a bucket holds a parameter the state was not built with")
        return name

    def shard_delta(self, name: str, length: int, dtype: torch.dtype) -> torch.Tensor:
        """This rank's downlink memory of its slice of parameter ``name`` (``sharded`` +
        ``bidirectional``), zeros at first."""
        t = self.shard_memory.get(name)
        if t is None or t.numel() != length:
            if t is not None:
                raise ValueError(f"shard memory of {name!r} has {t.numel()} entries, this rank's slice has {length} "
                                 "(another world size?)")
            t = self.shard_memory[name] = torch.zeros(length, dtype=dtype)
        return t.to(dtype)

    def lr_at(self, step: int) -> float:
        return float(self.lr(step) if callable(self.lr) else self.lr)

    def channel(self, device: torch.device) -> CollectiveChannel:
        """The collective channel of this state's process group (built on first use)."""
        if self._channel is None or self._channel.device != device:
            self._channel = CollectiveChannel(self.process_group, device, ledger=self.ledger)
        return self._channel

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    @property
    def uplink_bytes(self) -> int:
        """This rank's messages' frames (the algorithm's count)."""
        return self.ledger.uplink_bytes

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank handed to the collectives."""
        return self.ledger.sent_bytes

    @property
    def skipped_messages(self) -> int:
        """Messages dropped by ``on_nonfinite: skip`` so far."""
        if self.whole_model:
            return self.algorithm.skipped_messages
        return sum(s.alg.skipped_messages for s in self.segments.values())

    def _algorithms(self) -> list[Algorithm]:
        return [self.algorithm] if self.whole_model else [s.alg for s in self.segments.values()]

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and numbers (``torch.load(..., weights_only=True)`` loads it). One per rank:
        the memories differ between ranks."""
        def part(st):
            return None if st is None else st.flat[..., :].reshape(-1).clone().cpu()

        def compressor(s):
            state = self._whole_worker.compressor if self.whole_model else s.worker.compressor
            return None if state is None else {k: v.clone().cpu() for k, v in state.items()}

        return {
            "kinds": self.algorithm.kinds(),
            "step": self.step,
            "world_size": self.world_size if dist.is_initialized() else None,
            "rank": self.rank if dist.is_initialized() else None,
            "whole_model": self.whole_model,
            "ledger": self.ledger.state_dict(),
            "counters": {"dense_bytes": self.dense_bytes, "messages": self.messages,
                         "dense_fallbacks": self.dense_fallbacks, "skipped_messages": self.skipped_messages},
            "segments": self.layout.describe(),
            "memory": {n: part(s.worker.memory) for n, s in self.segments.items()},
            "momentum": {n: part(s.worker.momentum) for n, s in self.segments.items()},
            "server_momentum": {n: part(s.server.momentum) for n, s in self.segments.items()},
            "compressor": ({"__whole_model__": compressor(None)} if self.whole_model else
                           {n: compressor(s) for n, s in self.segments.items()}),
            "collective": self.collective,
            "shard_memory": {n: t.clone().cpu() for n, t in self.shard_memory.items()},
        }

    def load_state_dict(self, sd: dict, *, reset_memory: bool = False) -> None:
        """Restore :meth:`state_dict`. Everything is checked before anything changes (a refused
        checkpoint leaves this state as it was): a different algorithm, parameter set, world size
        or mode, or non-finite memories, are errors unless ``reset_memory`` (then only the step
        and the counters are restored, the memories start from zero)."""
        if not reset_memory:
            for piece, kind in self.algorithm.kinds().items():
                if sd["kinds"].get(piece) != kind:
                    raise ValueError(f"checkpoint was written with {piece} {sd['kinds'].get(piece)!r}, this state has {kind!r}")
            if sd["segments"] != self.layout.describe():
                raise ValueError(f"checkpoint parameters {sd['segments']['names']} (sizes {sd['segments']['sizes']}) do not "
                                 f"match this model's {list(self.layout.names)} (sizes {list(self.layout.sizes)}); "
                                 "pass reset_memory=True to start the memories from zero")
            if dist.is_initialized() and sd["world_size"] not in (None, self.world_size):
                raise ValueError(f"checkpoint was written by a world of {sd['world_size']} ranks, this one has "
                                 f"{self.world_size}; pass reset_memory=True to start the memories from zero")
            if bool(sd.get("whole_model", self.whole_model)) != self.whole_model:
                raise ValueError(f"checkpoint was written with whole_model={sd.get('whole_model')}, this state has "
                                 f"whole_model={self.whole_model}")
            if sd.get("collective", "allgather") != self.collective:
                raise ValueError(f"checkpoint was written with collective {sd.get('collective', 'allgather')!r}, this "
                                 f"state has {self.collective!r}; pass reset_memory=True to start the memories from zero")
        writes = []  # (destination, source): applied only when every check has passed
        if not reset_memory:
            for n, s in self.segments.items():
                for key, st in (("memory", s.worker.memory), ("momentum", s.worker.momentum),
                                ("server_momentum", s.server.momentum)):
                    got = sd[key][n]
                    if (got is None) != (st is None):
                        raise ValueError(f"checkpoint {key} of {n!r} is {'missing' if got is None else 'present'}")
                    if st is None:
                        continue
                    if got.numel() != st.flat.numel():
                        raise ValueError(f"checkpoint {key} of {n!r} has {got.numel()} entries, expected {st.flat.numel()}")
                    if not all_finite(got):
                        raise ValueError(f"checkpoint {key} of {n!r} holds non-finite values; "
                                         "pass reset_memory=True to start the memories from zero")
                    writes.append((st.flat, got.reshape(st.flat.shape)))
            mine = {"__whole_model__": self._whole_worker.compressor} if self.whole_model else {
                n: s.worker.compressor for n, s in self.segments.items()}
            for n, state in mine.items():
                comp = sd["compressor"].get(n)
                if (comp is None) != (state is None):
                    raise ValueError(f"checkpoint compressor state of {n!r} does not match this compressor")
                for k, v in (comp or {}).items():
                    if k not in state or state[k].shape != v.shape:
                        raise ValueError(f"checkpoint compressor state {n!r}/{k!r} does not match this compressor")
                    writes.append((state[k], v))
        shard_memory = {}
        if not reset_memory:
            for n, t in sd.get("shard_memory", {}).items():
                if n not in self.segments:
                    raise ValueError(f"checkpoint shard memory of {n!r}: no such parameter")
                if not all_finite(t):
                    raise ValueError(f"checkpoint shard memory of {n!r} holds non-finite values; "
                                     "pass reset_memory=True to start the memories from zero")
                shard_memory[n] = t.clone()
        counters = {k: int(v) for k, v in sd["counters"].items()}
        ledger = ByteLedger()
        ledger.load_state_dict(sd.get("ledger", {}))
        for dst, src in writes:
            dst.copy_(src)
        self.shard_memory = shard_memory
        self.step = int(sd["step"])
        self.ledger.load_state_dict(ledger.state_dict())
        self.dense_bytes, self.messages = counters.get("dense_bytes", 0), counters.get("messages", 0)
        self.dense_fallbacks = counters.get("dense_fallbacks", 0)
        algorithms = self._algorithms()
        for i, a in enumerate(algorithms):  # the skipped count lives in the algorithms: put it on one
            a.skipped_messages = counters.get("skipped_messages", 0) if i == 0 else 0

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["process_group"] = None
        d["_channel"] = None
        d.pop("_names", None)
        d.pop("_names_by_ptr", None)
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._names, self._names_by_ptr = {}, {}

    def bind(self, model: torch.nn.Module, process_group=None) -> "SparsifiedState":
        """After unpickling: attach to the (new) model's parameters and a process group."""
        params = _named_parameters(model)
        if list(params) != list(self.layout.names):
            raise ValueError(f"model parameters {list(params)} do not match the state's {list(self.layout.names)}")
        self._bind(params)
        self.process_group = process_group
        self._channel = None
        return self


