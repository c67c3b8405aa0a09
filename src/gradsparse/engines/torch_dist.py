"""``engine: torch``: the synchronous round as real processes on torch.distributed.

One process per worker (rank q = worker q), started by ``torchrun`` (``python -m
torch.distributed.run``) or ``gradsparse launch CONFIG --nproc N``; gloo on CPU, nccl when CUDA is
available (the collectives' tensors then live on ``cuda:LOCAL_RANK``; the model stays on CPU);
``GRADSPARSE_BACKEND=gloo`` forces gloo (needed for the parameter-server mode below, whose
point-to-point messages are CPU tensors; the nccl path is untested here: no GPU was lent).

Round t on every rank: draw the step's mini-batches from the shared seed (every rank draws all
workers' rows, so the random streams stay in step with ``sync``), compute worker q's gradient
alone, run the algorithm's worker step (n = 1, in place where it applies, as the loop engine
does) on worker q's state, then send its message's wire frames to every other rank through a
:class:`~gradsparse.comm.CollectiveChannel` (a size exchange, then ``all_to_all_single`` of the
uint8 frames) and decode theirs. Every rank then runs the same server step on the same N rows
(for the server topologies this replicates the server), so the model stays identical on every
rank and equals ``sync``'s.

Bytes: the frames a rank sends are the bytes the algorithm counts (``wire.encode`` of the
message, values already rounded to ``value_dtype``: their length is checked against the worker
step's size). The ledger charges the algorithm's rounds with the simulator's rule
(:class:`~gradsparse.comm.SimulatedRounds`, so ``uplink_bytes``/``downlink_bytes`` equal
``sync``'s; with a replicated server the downlink message is computed on every rank, not sent)
and, from the channel, ``sent_bytes``: what this rank handed to the collectives;
``all_ranks_sent_bytes`` sums the ranks' ``sent_bytes`` of every round (one 8-byte all-reduce a
step, charged as diagnostics): the figure the simulator predicts for the same collective.

Collectives (``collective``, :mod:`gradsparse.comm.collectives`), in replicated mode:

* ``allgather``: every rank's frames to every other rank (above);
* ``sharded``: rank q splits its message by owner (:class:`~gradsparse.comm.collectives.ShardPlan`
  over the task's segments), pushes each part to its owner (split-size exchange, then
  ``all_to_all_single``), sums the P parts of its own shard in rank order with the weights p_q,
  and sends the reduced shard (the union of the parts' supports, values rounded to
  ``value_dtype``) to every rank; every rank assembles the aggregate from the P shards and the
  server step applies it. With topology ``bidirectional`` the owner sends C_down of its shard
  instead (top-k of each of its slices, G = U + delta with its slice of the downlink memory) and
  every rank applies what the owners sent;
* ``allreduce``: the k values of the shared random-k support (scaled by p_q) summed by one
  ``all_reduce``; every rank regenerates the support.

Under ``sharded`` and ``allreduce`` the whole messages do not travel, but rank 0's metrics need
them: every rank's frames are all-gathered as diagnostics (``diagnostic_bytes``), and the
replicated server step runs on them for the record (its update is replaced by what the
transport delivered).

Parameter-server mode: for ``ps_uplink``, ``bidirectional`` and ``downlink_only`` started with
one process more than workers (``--nproc N+1``), rank 0 is a real server and ranks 1..N the
workers: every worker sends its message's frames to the server, which receives all N (in worker
order), runs the server step and sends its one downlink message's frames to each worker
(:class:`~gradsparse.comm.PointToPointChannel`: one header, then the frames, over Gloo
``send``/``recv``): the aggregate A for ``ps_uplink`` (workers run the same momentum and step
size on it), C_down(G) for ``bidirectional``/``downlink_only`` (workers apply it as is). Rank
0's ledger counts every message it receives and sends (the run's whole ledger, equal to
``sync``'s); a worker's its own share. Rank 0 (the server) writes the run directory.

Diagnostics, so that every metric, the run directory and the checkpoint are the same as
``sync``'s: the gradients, accumulated vectors, feedback inputs and new memory/momentum rows of
all workers reach rank 0 (replicated mode: all-gathered on every rank; parameter-server mode:
sent to the server after each message). They are not messages of the algorithm: the ledger
counts them as ``diagnostic_bytes``.

Multi-machine runs: ``torchrun --nnodes M --nproc-per-node P --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m gradsparse.distributed.worker CONFIG --out DIR`` on every machine
(workers.count = M * P; GLOO_SOCKET_IFNAME names the interface).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import dataclasses

from .. import wire
from ..algorithm import ServerStepOutput, WorkerState, WorkerStepOutput
from ..comm import CollectiveChannel, PointToPointChannel
from ..comm import collectives as coll
from ..feedback import FeedbackOutput
from ..messages import SparseBatch
from ..segments import SegmentedTensor
from .synchronous import SynchronousEngine

__all__ = ["TorchDistEngine"]


def _init_from_env() -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "engine 'torch' runs one process per worker under torchrun: use "
            "`gradsparse launch CONFIG --nproc N` (or torchrun ... -m gradsparse.distributed.worker CONFIG)"
        )
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("GRADSPARSE_BACKEND", "") != "gloo" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # torchrun may keep one store across restarts of the job: the keys of a failed attempt (its
    # ranks' addresses) must not be read by the next one, so each attempt gets its own prefix
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"gradsparse/attempt{attempt}/", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def world_sizes(n_workers: int, has_server: bool) -> tuple[int, ...]:
    """The process counts engine 'torch' accepts: one per worker (every rank runs the server
    step), or, for a topology with a server, one more (rank 0 is a parameter server)."""
    return (n_workers, n_workers + 1) if has_server else (n_workers,)


def _as_uint8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class TorchDistEngine(SynchronousEngine):
    name = "torch"

    def __init__(self, task, algorithm, schedule, **kw) -> None:
        _init_from_env()
        super().__init__(task, algorithm, schedule, **kw)
        world = dist.get_world_size()
        #: parameter-server mode: one more process than workers, rank 0 serves over point-to-point
        self.parameter_server = algorithm.topology.has_server and world == self.n_workers + 1
        if world not in world_sizes(self.n_workers, algorithm.topology.has_server):
            more = f" or {self.n_workers + 1} (a parameter server and the workers)" if algorithm.topology.has_server else ""
            raise ValueError(f"engine 'torch' runs one process per worker: workers.count = {self.n_workers}, "
                             f"but {world} processes were started (launch with --nproc {self.n_workers}{more}, "
                             f"or --set workers.count={world})")
        if self.parameter_server and self.stagewise is not None:
            raise ValueError("engine 'torch' with a parameter server does not run stagewise learning")
        if self.parameter_server and self.collective != "allgather":
            raise ValueError(f"engine 'torch' with a parameter server on rank 0 sends point to point; collective "
                             f"{self.collective!r} needs one process per worker (--nproc {self.n_workers})")
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        #: what really carries the messages; charges ``sent_bytes`` of the shared ledger
        if self.parameter_server:
            self.transport = PointToPointChannel("server" if self.rank == 0 else "worker", ledger=self.ledger)
        else:
            self.transport = CollectiveChannel(device=self.device, charge_messages=False, ledger=self.ledger)
            self.channel.predicts_sent = False  # all_ranks_sent_bytes: what the ranks' transports were handed
        self._delivered_update: torch.Tensor | None = None
        self._transported: torch.Tensor | None = None

    agrees_to_stop = True

    def agree_to_stop(self, found, signum: int | None):
        """After every step, every rank learns whether any rank saw a non-finite value or got a
        signal, so all of them stop after the same step with the same report (rank 0 records the
        loss, so only it can see a non-finite loss; a memory is one rank's own). Cost: one
        two-integer all_reduce per step; the reports are gathered only when there is one."""
        flags = torch.tensor([0 if found is None else 1, 0 if signum is None else int(signum)],
                             dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if int(flags[0]):
            reports = [None] * dist.get_world_size()
            dist.all_gather_object(reports, found)
            found = next(r for r in reports if r is not None)
        return found, (int(flags[1]) or None)

    @classmethod
    def synchronous_equivalent(cls, config):
        """Cannot be stepped in the test process: tests/test_torch_engine.py launches real
        processes for its configs instead."""
        return None

    def _gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """[1, m] on every rank -> [N, m] (row q from rank q): diagnostics."""
        return self.transport.gather_diagnostics(row.reshape(-1)).to(row.dtype)

    def _frames(self, out: WorkerStepOutput) -> torch.Tensor:
        """The wire frames of this rank's message as a uint8 tensor: exactly the bytes the worker
        step counted (its values are already what a receiver decodes)."""
        data = wire.encode(out.message, value_dtype=self.alg.value_dtype)
        if len(data) != int(out.nbytes.sum()):  # pragma: no cover - the wire's own invariant
            raise AssertionError(f"frames of {len(data)} bytes, the worker step counted {int(out.nbytes.sum())}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)

    def _decoded(self, payload: torch.Tensor) -> SparseBatch:
        batch = wire.decode(payload.cpu().numpy(), max_d=self.d)
        return batch.with_values(batch.values.to(self.dtype))

    def worker_round(self, w, t, lr):
        q = self.rank
        idx = self.data.sample()  # all workers' rows: the generator advances as in sync
        self.samples_seen += sum(len(r) for r in idx) if isinstance(idx, list) else idx.numel()
        rows = idx[q]
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g = self.shifted(self._grad(w, x, y), lambda x_star: self._grad(x_star, x, y))
        fed = self.feedback_gradients(g[None], w)
        out = self.alg.worker_update_(fed, w, self.worker_state.rows(slice(q, q + 1)), step=t, lr=lr,
                                      workers=self.worker_ids[q : q + 1], in_place=self.stagewise is None)
        payload = self._frames(out)
        sent_before = self.ledger.sent_bytes
        self._transported = self._delivered_update = None
        if self.collective == "allgather":
            sizes, _ = self.transport.exchange_sizes(payload.numel())
            parts = self.transport.send_frames(payload, sizes).wait()
        else:
            if self.collective == "sharded":
                self._sharded_round(out, t, lr)
            else:
                self._allreduce_round(out, t)
            parts = self.transport.gather_payloads_diagnostic(payload)  # rank 0's metrics need every message
            sizes = [int(p.numel()) for p in parts]
        self.ledger.add_all_ranks_sent(self.transport.sum_over_ranks(self.ledger.sent_bytes - sent_before))
        message = SparseBatch.cat([out.message if r == q else self._decoded(parts[r]) for r in range(self.n_workers)])
        nbytes = torch.tensor(sizes, dtype=torch.long)
        # diagnostics: every worker's gradient, accumulated vector and new state on every rank
        grads = self._gather_rows(g)
        new = out.state

        def gathered(st):
            return None if st is None else SegmentedTensor(st.layout, self._gather_rows(st.flat).to(st.flat.dtype))

        compressor = None
        if new.compressor is not None:
            compressor = {k: self._gather_rows(v) for k, v in new.compressor.items()}
        accumulated = self._gather_rows(out.accumulated())
        live = self._renew_live_token()
        # every worker's new state into the engine's own buffers (views of them stay current)
        state = self.worker_state.copy_(WorkerState(gathered(new.memory), gathered(new.momentum), compressor))
        feedback = FeedbackOutput(message, message.gather(accumulated), accumulated)
        inputs = None if out.feedback_input is None else self._gather_rows(out.feedback_input)
        return grads, WorkerStepOutput(message, nbytes, state, feedback, inputs), live

    # ---- the collectives ------------------------------------------------------------------------
    def transported_aggregate(self, message):
        if self.collective == "allgather" or self.alg.topology.compresses_downlink:
            return None
        return self._transported

    def delivered(self, server: ServerStepOutput) -> ServerStepOutput:
        if self._delivered_update is None:
            return server
        return dataclasses.replace(server, update=self._delivered_update)

    def _sharded_round(self, out: WorkerStepOutput, t: int, lr: float) -> None:
        """Push this rank's parts to their owners, reduce this rank's shard, pull every shard."""
        plan, q, vd, channel = self.shard_plan, self.rank, self.alg.value_dtype, self.transport
        row = out.message
        frames = [coll.encode_part(plan.owner_sizes[o], i, v, vd) for o, (i, v) in
                  enumerate(plan.split(row.indices, row.values))]
        received_sizes, _, _ = channel.exchange_split_sizes([len(f) for f in frames])
        got = channel.send_parts([_as_uint8(f) for f in frames], received_sizes).wait()
        size = plan.owner_sizes[q]
        parts = []
        for sender, payload in enumerate(got):
            if payload.numel() == 0:
                parts.append((torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=self.dtype)))
                continue
            b = wire.decode(payload.cpu().numpy(), max_d=max(size, 1))
            parts.append((b.indices, b.values.to(self.dtype)))
        acc, union = coll.reduce_shard(size, parts, self.weights.tolist(), self.dtype)
        if self.alg.topology.compresses_downlink:  # G = U + delta on this owner's slices; send C_down(G)
            update = acc if self.alg.lr_inside else lr * acc
            delta = self.server_state.downlink_memory.flat
            mine = plan.pieces_of(q)
            G = update + torch.cat([delta[a : a + n] for a, n, _ in mine]) if mine else update
            cols, vals = coll.compress_shard(plan, q, G, self.alg.down_compressor.density, vd)
        else:
            cols, vals = union, wire.round_values(acc[union], vd)
        shard = _as_uint8(coll.encode_part(size, cols, vals, vd))
        sizes, _ = channel.exchange_sizes(shard.numel())
        shards = channel.send_frames(shard, sizes, role="pull").wait()
        total = torch.zeros(self.d, dtype=self.dtype)
        for owner, payload in enumerate(shards):
            if payload.numel():
                b = wire.decode(payload.cpu().numpy(), max_d=max(plan.owner_sizes[owner], 1))
                total[plan.to_global(owner, b.indices)] = b.values.to(self.dtype)
        if self.alg.topology.compresses_downlink:
            self._delivered_update = total  # what the owners sent is what every rank applies
        else:
            self._transported = total

    def _allreduce_round(self, out: WorkerStepOutput, t: int) -> None:
        """Sum p_q x the k values of the shared support over the ranks (one all_reduce)."""
        cols = coll.shared_support(self.alg.compressor, t, self.d)
        vt = wire.value_dtype_of(self.alg.value_dtype)
        values = torch.zeros(cols.numel(), dtype=self.dtype)
        row = out.message
        if row.nnz:  # a skipped message (on_nonfinite: skip) adds zeros
            if not torch.equal(row.indices, cols):  # pragma: no cover - the compressor's own contract
                raise AssertionError("a shared-support random-k message does not hold the shared support")
            values = self.weights[self.rank].to(self.dtype) * row.values.to(self.dtype)
        summed = self.transport.all_reduce_values(values.to(vt)).wait()
        total = torch.zeros(self.d, dtype=self.dtype)
        total[cols] = summed.to(self.dtype)
        self._transported = total

    # ---- parameter-server mode ----------------------------------------------------------------
    def step(self):
        if not self.parameter_server:
            return super().step()
        from .synchronous import StepRecord

        t, n = self.t, self.n_workers
        lr = float(self.schedule(t, self.epoch))
        w = self.w
        idx = self.data.sample()  # every rank draws all workers' rows: the streams stay in step with sync
        self.samples_seen += sum(len(r) for r in idx) if isinstance(idx, list) else idx.numel()
        d, vd = self.d, self.alg.value_dtype
        mem, mom = self.worker_state.memory, self.worker_state.momentum
        diag_width = d * (3 + (mem is not None) + (mom is not None))  # g, accumulated, feedback input, memory, momentum
        server_before = self.server_state
        channel = self.transport
        if self.rank == 0:  # the server
            messages, charged = [], []
            grads, acc, fin = (torch.zeros(n, d, dtype=self.dtype) for _ in range(3))
            for q in range(n):
                _, head, batch = channel.recv("uplink", q + 1, step=t, max_d=d)
                batch = batch.with_values(batch.values.to(self.dtype))
                diag = channel.recv_tensor(diag_width, self.dtype, q + 1)
                grads[q], acc[q], fin[q] = diag[:d], diag[d : 2 * d], diag[2 * d : 3 * d]
                off = 3 * d
                for st in (mem, mom):
                    if st is not None:
                        st.flat[q] = diag[off : off + d]
                        off += d
                messages.append(batch)
                charged.append(head.nbytes)
            message = SparseBatch.cat(messages)
            srv = self.alg.server_step(message, self.server_state, step=t, lr=lr, weights=self.weights)
            for q in range(n):
                channel.send(q + 1, "downlink", srv.message, step=t, value_dtype=vd)
            update, down_nbytes = srv.update, srv.nbytes
            up_nbytes = torch.tensor(charged, dtype=torch.long)
            self.server_state = srv.state
        else:  # worker q
            q = self.rank - 1
            rows = idx[q]
            x, y = self.task.train_x[rows], self.task.train_y[rows]
            g = self.shifted(self._grad(w, x, y), lambda x_star: self._grad(x_star, x, y))
            out = self.alg.worker_update_(g[None], w, self.worker_state.rows(slice(q, q + 1)), step=t, lr=lr,
                                          workers=self.worker_ids[q : q + 1])
            channel.send(0, "uplink", out.message, step=t, value_dtype=vd)
            fin_q = out.feedback_input[0] if out.feedback_input is not None else g
            parts = [g, out.accumulated()[0], fin_q] + [st.flat[q] for st in (mem, mom) if st is not None]
            channel.send_tensor(torch.cat(parts).to(self.dtype), 0)
            _, head, down = channel.recv("downlink", 0, step=t, max_d=d)
            down = down.with_values(down.values.to(self.dtype))
            up_nbytes, down_nbytes = out.nbytes, head.nbytes
            if self.alg.topology.compresses_downlink:  # C_down(G): applied as is
                update = down.to_dense(self.dtype)[0]
                srv = ServerStepOutput(update, update, update, down, down_nbytes, self.server_state, self.weights)
            else:  # ps_uplink: the aggregate A (as decoded); the same momentum and step size as the server
                a = down.to_dense(self.dtype)
                srv = self.alg.server_step(SparseBatch.from_dense(a), self.server_state, step=t, lr=lr,
                                           weights=torch.ones(1, dtype=self.dtype))
                update = srv.update
                self.server_state = srv.state
            message, grads, acc, fin = out.message, g[None], out.accumulated(), None
        self.w = w - update
        up, down_total = self.alg.topology.synchronous_traffic(up_nbytes, down_nbytes, n)
        if self.rank == 0:
            self.density_sum += float(message.counts.double().mean()) / d
        else:
            self.density_sum = float("nan")  # only the server knows every worker's count
        if self.track_total_error and mem is not None and self.rank == 0:
            self.total_error += float(mem.flat.double().square().sum()) / n
        self.t += 1
        # the accumulated vectors as full rows (FeedbackOutput.accumulated), so step metrics work
        worker = WorkerStepOutput(message, up_nbytes, self.worker_state,
                                  FeedbackOutput(message, message.values, acc), fin)
        return StepRecord(t, lr, w, grads, worker, srv, server_before, up, down_total, [True])
