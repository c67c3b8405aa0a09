"""A DDP communication hook: top-k / random-k / hard-threshold with error feedback.

Drop it into any ``DistributedDataParallel`` training script::

    import gradsparse.ddp
    from gradsparse.algorithm import Algorithm
    from gradsparse.compressors import TopK

    model = DDP(net)
    alg = Algorithm(compressor=TopK(density=0.01, scope="layerwise", layout=gradsparse.ddp.layout_of(net)),
                    feedback="ef")
    state = gradsparse.ddp.SparsifiedState(model, alg, lr=0.1)
    model.register_comm_hook(state, gradsparse.ddp.hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)   # plain SGD applies the algorithm's update

What the hook does, per bucket, at step t (all of it in the hook body; the future it returns is
already complete):

1. For each parameter of the bucket (found with ``bucket.parameters()`` and named through the
   name map the state was built with), run the algorithm's worker step on that parameter's
   gradient as a one-row segment: momentum (if any), ``a = e + c g``, ``s = C(a)``, ``e <- a - s``.
   This is :meth:`gradsparse.algorithm.Algorithm.worker_step_in_place` (or ``worker_step`` with
   worker momentum / weight decay) of a per-parameter algorithm whose compressor is the model-wide
   one restricted to that parameter, so the result equals the simulator's ``scope: layerwise``
   (top-k: ``k_l`` from the layer-wise rule; hard-threshold: the same lambda). The memories
   (and momentum, compressor state) are keyed by parameter NAME, so DDP's bucket rebuild after
   the first iteration loses nothing.
2. Exchange the messages of all ranks (:func:`gradsparse.distributed.exchange.all_gather_rows`):
   fixed counts (top-k, random-k) in one fixed-size ``all_gather`` of indices and value bits;
   varying counts (hard-threshold) with a size exchange then a padded ``all_gather``. Identity
   messages (dense) go through one ``all_reduce``.
3. Run the server step on the N gathered rows (weights 1/N; server momentum if configured) and
   write into the bucket ``U / lr`` for ``ef``/``ef-scaled``/``none`` (the step size is inside
   the messages) or ``U`` for ``memory``, so ``torch.optim.SGD(lr)`` without momentum or weight
   decay applies exactly the algorithm's update ``w <- w - U``. (With another optimizer, prefer
   ``feedback: memory``: the bucket then holds the averaged compressed direction.)

Cost model of the dense fall-back (``dense_fallback=True``): after the sizes are known, an
all-gather makes every rank receive ``(N - 1) * M * (8 + b)`` bytes (M: the largest per-rank
entry count of the bucket, b: the value size), a ring all-reduce of the densified messages
``2 (N - 1) / N * D * b`` (D: the bucket's size). When the first is larger the messages are
densified locally and all-reduced; the aggregate is the same sum (up to the summation order),
and the byte counters still count the messages' wire sizes. Only fixed counts use it (they know
M before any collective); varying counts always go through the size exchange and the padded
all-gather.

``scope: entire`` (one top-k over the concatenation of all parameters, in registration order)
cannot be decided per bucket: it runs in *whole-model mode* (``whole_model=True``, the default
for ``TopK(scope="entire")``; also usable for random-k and the others to get the simulator's
whole-vector compression). Each bucket's gradients are copied into one model-sized buffer and
its future is left pending; at the last bucket the algorithm runs once on the whole model (one
message, one exchange) and every pending future gets its own fresh tensor. The cost: no bucket
communicates before the backward pass has finished (DDP's overlap of communication with
backward is lost), and one model-sized gradient buffer. Weight decay inside the algorithm and
stateful compressors are not supported in this mode.

Other features: ``warmup_steps`` uncompressed steps (a dense ``all_reduce`` of the averaged
gradient, no memory change); gradients in fp16/bf16 keep fp32 memories (``memory_dtype``);
byte counters (``uplink_bytes``: the exact wire size, :func:`gradsparse.wire.encoded_nbytes`, of
what this rank sent; ``dense_bytes``: what the dense frames of the same parameters would cost;
``payload_bytes``: the raw bytes this rank put on the collectives, padding excluded).
:meth:`SparsifiedState.state_dict` holds plain tensors (loads under ``torch.load(weights_only=True)``,
one file per rank); ``pickle`` drops the process group (``__getstate__``/``__setstate__``).

The step counter advances when the last bucket of an iteration is reduced (``bucket.is_last()``).
Python comm hooks cannot be compiled (eager only).
"""


from dataclasses import dataclass

import torch
import torch.distributed as dist

from .algorithm import Algorithm, ServerState, WorkerState
from .compressors import ApproximateTopK, Compressor, RandomK, TopK
from .distributed.exchange import all_gather_rows
from .messages import SparseBatch
from .segments import Layout, SegmentedTensor

__all__ = ["SparsifiedState", "hook", "layout_of", "segment_compressor"]


def _named_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {n: p for n, p in inner.named_parameters() if p.requires_grad}


def layout_of(model: torch.nn.Module) -> Layout:
    """The model's segments (trainable parameters in registration order; a DDP wrapper's
    ``module.`` prefix is not part of the names)."""
    return Layout.of(_named_parameters(model))


def segment_compressor(compressor: Compressor, layout: Layout, index: int) -> Compressor:
    """The model-wide compressor restricted to segment ``index`` of ``layout``: what the
    simulator's ``scope: layerwise`` applies to that segment alone."""
    d, d_l = layout.d, layout.sizes[index]
    if isinstance(compressor, TopK):
        if compressor.scope != "layerwise":
            raise ValueError(
                "the DDP hook compresses each parameter alone: top-k needs scope 'layerwise' "
                "(scope 'entire' would wait for the last bucket and lose the overlap; not supported)"
            )
        a, b, k_l = compressor.segment_ks(d)[index]
        return TopK(k=k_l)
    if isinstance(compressor, (RandomK, ApproximateTopK)):
        # one random stream per segment: the segment index shifts the seed
        amount = {"density": compressor.density} if compressor.density is not None else {
            "k": min(d_l, max(1, round(compressor.k * d_l / d)))}
        if isinstance(compressor, RandomK):
            return RandomK(seed=compressor.seed + 1_000_003 * index, scale=compressor.scale, **amount)
        return ApproximateTopK(sample_fraction=compressor.sample_fraction, exact=compressor.exact,
                               seed=compressor.seed + 1_000_003 * index, **amount)
    return compressor  # identity, hard-threshold and other element-wise compressors


@dataclass
class _Segment:
    name: str
    alg: Algorithm
    layout: Layout
    worker: WorkerState
    server: ServerState


class SparsifiedState:
    """State of :func:`hook`: the algorithm, the step counter, byte counters, and per parameter
    name the error-feedback memory, momentum and compressor state.

    model:          the DDP model (or its module): trainable parameters give the names
    algorithm:      an :class:`~gradsparse.algorithm.Algorithm` with topology ``all_to_all``
    lr:             the step size alpha_t the algorithm uses (a number or ``fn(step) -> float``);
                    ``ef``/``ef-scaled``/``none`` put it inside the messages, give the
                    optimizer the same value
    warmup_steps:   this many first steps are dense all-reduce (no compression, no memory)
    dense_fallback: all-reduce densified messages when that costs less (see the module docstring)
    memory_dtype:   dtype of memories and momentum (default: float32 for fp16/bf16 parameters,
                    else the parameter's dtype)
    process_group:  the group to communicate in (default: the world)
    """

    def __init__(self, model: torch.nn.Module, algorithm: Algorithm, *, lr=1.0, warmup_steps: int = 0,
                 dense_fallback: bool = False, memory_dtype: torch.dtype | None = None, process_group=None,
                 whole_model: bool | None = None) -> None:
        if algorithm.topology.kind != "all_to_all":
            raise ValueError(f"the DDP hook runs topology all_to_all, got {algorithm.topology.kind!r} "
                             "(parameter servers: gradsparse.distributed)")
        params = _named_parameters(model)
        self.algorithm = algorithm
        self.layout = Layout.of(params)
        self.lr = lr
        self.warmup_steps = int(warmup_steps)
        self.dense_fallback = bool(dense_fallback)
        self.memory_dtype = memory_dtype
        self.process_group = process_group
        self.step = 0
        self.uplink_bytes = 0
        self.dense_bytes = 0
        self.payload_bytes = 0
        self.messages = 0
        self.dense_fallbacks = 0
        self._bind(params)
        self.segments: dict[str, _Segment] = {}
        c = algorithm.compressor
        self.whole_model = (isinstance(c, TopK) and c.scope == "entire") if whole_model is None else bool(whole_model)
        if not self.whole_model:
            for i, (name, p) in enumerate(params.items()):
                self.segments[name] = self._new_segment(i, name, p)
            return
        # whole-model mode: one state over the layout; each name's entry is a view into it
        first = next(iter(params.values()))
        dtype, device = self._dtype_for(first), first.device
        self._whole_worker = algorithm.init_worker_state(self.layout, 1, dtype)
        self._whole_server = algorithm.init_server_state(self.layout, dtype)
        if algorithm.weight_decay:
            raise ValueError("whole-model mode does not apply weight decay inside the algorithm; use the optimizer's")
        if self._whole_worker.compressor is not None:
            raise ValueError("whole-model mode does not keep a stateful compressor's state; use layer-wise compression")
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
                        value_dtype=a.value_dtype, staleness=a.staleness)
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

    def lr_at(self, step: int) -> float:
        return float(self.lr(step) if callable(self.lr) else self.lr)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.process_group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.process_group)

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and numbers (``torch.load(..., weights_only=True)`` loads it). One per rank:
        the memories differ between ranks."""
        def part(st):
            return None if st is None else st.flat[..., :].reshape(-1).clone().cpu()

        return {
            "kinds": self.algorithm.kinds(),
            "step": self.step,
            "world_size": self.world_size if dist.is_initialized() else None,
            "rank": self.rank if dist.is_initialized() else None,
            "counters": {"uplink_bytes": self.uplink_bytes, "dense_bytes": self.dense_bytes,
                         "payload_bytes": self.payload_bytes, "messages": self.messages,
                         "dense_fallbacks": self.dense_fallbacks},
            "segments": self.layout.describe(),
            "memory": {n: part(s.worker.memory) for n, s in self.segments.items()},
            "momentum": {n: part(s.worker.momentum) for n, s in self.segments.items()},
            "server_momentum": {n: part(s.server.momentum) for n, s in self.segments.items()},
            "compressor": {n: (None if s.worker.compressor is None else {k: v.clone().cpu() for k, v in s.worker.compressor.items()})
                           for n, s in self.segments.items()},
        }

    def load_state_dict(self, sd: dict, *, reset_memory: bool = False) -> None:
        """Restore :meth:`state_dict`; a different algorithm, parameter set or world size is an
        error unless ``reset_memory`` (then only the step and counters are restored)."""
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
        self.step = int(sd["step"])
        for k, v in sd["counters"].items():
            setattr(self, k, int(v))
        if reset_memory:
            return
        for n, s in self.segments.items():
            for key, st in (("memory", s.worker.memory), ("momentum", s.worker.momentum),
                            ("server_momentum", s.server.momentum)):
                got = sd[key][n]
                if (got is None) != (st is None):
                    raise ValueError(f"checkpoint {key} of {n!r} is {'missing' if got is None else 'present'}")
                if st is not None:
                    st.flat.copy_(got.reshape(st.flat.shape))
            comp = sd["compressor"][n]
            if (comp is None) != (s.worker.compressor is None):
                raise ValueError(f"checkpoint compressor state of {n!r} does not match this compressor")
            if comp is not None:
                for k, v in comp.items():
                    s.worker.compressor[k].copy_(v)

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["process_group"] = None
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
        return self


def _done(t: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(t)
    return fut


def hook(state: SparsifiedState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The communication hook (see the module docstring)."""
    buf = bucket.buffer()
    group = state.process_group
    world = dist.get_world_size(group)
    step = state.step
    params = bucket.parameters()  # the buffer holds their gradients back to back, in this order
    if step < state.warmup_steps:
        buf.div_(world)
        dist.all_reduce(buf, group=group)
        nbytes = sum(_dense_nbytes(p) for p in params)
        state.uplink_bytes += nbytes
        state.dense_bytes += nbytes
        state.messages += len(params)
        state.payload_bytes += buf.numel() * buf.element_size()
        if bucket.is_last():
            state.step += 1
        return _done(buf)

    if state.whole_model:
        return _whole_model_bucket(state, bucket, buf, params, step, world, group)
    lr = state.lr_at(step)
    rank_id = torch.tensor([dist.get_rank(group)])
    segs, messages = [], []
    start = 0
    for p in params:
        g = buf[start : start + p.numel()]
        start += p.numel()
        seg = state.segments[state.name_of(p)]
        dtype = seg.worker.memory.flat.dtype if seg.worker.memory is not None else state._dtype_for(p)
        g_row = g.detach().reshape(1, -1).to(dtype)
        if seg.alg.supports_in_place:
            out = seg.alg.worker_step_in_place(g_row, seg.worker, step=step, lr=lr, workers=rank_id)
        else:
            w = p.detach().reshape(-1).to(dtype) if seg.alg.weight_decay else None
            out = seg.alg.worker_step(g_row, w, seg.worker, step=step, lr=lr, workers=rank_id)
            seg.worker = out.state
        state.uplink_bytes += int(out.nbytes.sum())
        state.dense_bytes += _dense_nbytes(p, seg.alg.value_dtype)
        state.messages += 1
        segs.append(seg)
        messages.append(out.message)

    vb = messages[0].values.element_size()
    total = sum(m.d for m in messages)
    if all(m.dense for m in messages):
        aggregated = _allreduce_dense(messages, group, buf.device)
    else:
        fixed = all(m.fixed_k is not None for m in messages)
        densify = False
        if state.dense_fallback and fixed:
            m_max = sum(m.values.numel() for m in messages)
            densify = (world - 1) * m_max * (8 + vb) > 2 * (world - 1) / world * total * vb
        if densify:
            aggregated = _allreduce_dense(messages, group, buf.device)
            state.dense_fallbacks += 1
        else:
            ex = all_gather_rows(messages, group=group)
            state.payload_bytes += ex.payload_bytes
            aggregated = [(b, torch.full((world,), 1.0 / world, dtype=b.values.dtype, device=b.values.device))
                          for b in ex.gathered]
    off = 0
    for p, seg, (batch, weights) in zip(params, segs, aggregated):
        n = p.numel()
        target = buf[off : off + n]
        off += n
        if _plain_average(seg.alg) and target.dtype == batch.values.dtype:
            # the server step's update is lr * aggregate and SGD(lr) applies w <- w - lr * grad:
            # the bucket holds the aggregate, summed straight into it (no server state to keep)
            batch.weighted_sum(weights, out=target)
            continue
        srv = seg.alg.server_step(batch, seg.server, step=step, lr=lr, weights=weights)
        seg.server = srv.state
        # U / lr: SGD(lr) then applies w <- w - U (for memory, U = lr * D: the bucket holds D)
        update = srv.update / lr if lr != 0 else srv.update
        target.copy_(update.reshape(-1).to(buf.dtype))
    if bucket.is_last():
        state.step += 1
    return _done(buf)


def _whole_model_bucket(state: SparsifiedState, bucket, buf, params, step: int, world: int, group):
    """Whole-model mode: keep this bucket's gradients; at the last bucket compress the whole model
    once and resolve every bucket's future with its own fresh tensor."""
    names, start = [], 0
    for p in params:
        name = state.name_of(p)
        a, b = state._bounds[name]
        state._grad_full[a:b].copy_(buf[start : start + p.numel()].reshape(-1))
        start += p.numel()
        names.append(name)
    fut = torch.futures.Future()
    state._pending.append((names, fut, buf.dtype))
    if not bucket.is_last():
        return fut
    alg, lr = state.algorithm, state.lr_at(step)
    rank_id = torch.tensor([dist.get_rank(group)])
    g = state._grad_full[None]
    worker = state._whole_worker
    if alg.supports_in_place:
        out = alg.worker_step_in_place(g, worker, step=step, lr=lr, workers=rank_id)
    else:
        out = alg.worker_step(g, None, worker, step=step, lr=lr, workers=rank_id)
        for mine, new in ((worker.memory, out.state.memory), (worker.momentum, out.state.momentum)):
            if mine is not None:
                mine.flat.copy_(new.flat)  # in place: the per-name views stay current
    state.uplink_bytes += int(out.nbytes.sum())
    state.dense_bytes += sum(_dense_nbytes(torch.empty(b - a), alg.value_dtype) for a, b in state._bounds.values())
    state.messages += 1
    if out.message.dense:
        batch, weights = _allreduce_dense([out.message], group, buf.device)[0]
    else:
        ex = all_gather_rows([out.message], group=group)
        state.payload_bytes += ex.payload_bytes
        batch = ex.gathered[0]
        weights = torch.full((world,), 1.0 / world, dtype=batch.values.dtype, device=batch.values.device)
    srv = alg.server_step(batch, state._whole_server, step=step, lr=lr, weights=weights)
    if state._whole_server.momentum is not None:
        state._whole_server.momentum.flat.copy_(srv.state.momentum.flat)
    update = srv.update / lr if lr != 0 else srv.update
    for bucket_names, f, dtype in state._pending:  # each future gets its own fresh tensor
        f.set_result(torch.cat([update[state._bounds[n][0] : state._bounds[n][1]] for n in bucket_names]).to(dtype))
    state._pending = []
    state.step += 1
    return fut


def _plain_average(alg: Algorithm) -> bool:
    """Whether the server step's update is exactly lr times the weighted aggregate (no server
    momentum, no compressed downlink, the step size outside the feedback)."""
    return alg.momentum.side != "server" and not alg.lr_inside and not alg.topology.compresses_downlink


def _dense_nbytes(p: torch.Tensor, value_dtype: str = "fp32") -> int:
    """Wire size of one dense frame of ``p``'s size (no allocation: the frame size is arithmetic)."""
    from . import wire
    from .wire.format import VALUE_DTYPE_TABLE, resolve_value_dtype

    return wire.dense_nbytes(p.numel(), VALUE_DTYPE_TABLE[resolve_value_dtype(value_dtype)].itemsize)


def _allreduce_dense(messages: list[SparseBatch], group, device):
    """Sum of the densified messages of all ranks in one all_reduce; each segment's aggregate as
    a one-row dense batch with weight 1/N."""
    world = dist.get_world_size(group)
    dense = torch.cat([m.to_dense()[0] for m in messages])
    dist.all_reduce(dense, group=group)
    out, off = [], 0
    for m in messages:
        row = dense[off : off + m.d][None]
        off += m.d
        out.append((SparseBatch.from_dense(row), torch.full((1,), 1.0 / world, dtype=row.dtype, device=row.device)))
    return out
