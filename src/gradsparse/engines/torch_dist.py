"""``engine: torch``: the synchronous round as real processes on torch.distributed.

One process per worker (rank q = worker q), started by ``torchrun`` (``python -m
torch.distributed.run``) or ``gradsparse launch CONFIG --nproc N``; gloo on CPU, nccl when CUDA is
available (the collectives' tensors then live on ``cuda:LOCAL_RANK``; the model stays on CPU);
``GRADSPARSE_BACKEND=gloo`` forces gloo (needed for the parameter-server mode below, whose
point-to-point messages are CPU tensors; the nccl path is untested here: no GPU was lent).

Round t on every rank: draw the step's mini-batches from the shared seed (every rank draws all
workers' rows, so the random streams stay in step with ``sync``), compute worker q's gradient
alone, run the algorithm's worker step (n = 1, in place where it applies, as the loop engine
does) on worker q's state, then exchange the N messages
(:func:`gradsparse.distributed.exchange.all_gather_rows`: one fixed-size ``all_gather`` for
fixed counts, a size exchange and a padded ``all_gather`` for varying counts) and their exact
wire sizes. Every rank then runs the same server step on the same N rows (for the server
topologies this replicates the server), so the model stays identical on every rank and
equals ``sync``'s.

Parameter-server mode: for ``ps_uplink``, ``bidirectional`` and ``downlink_only`` started with
one process more than workers (``--nproc N+1``), rank 0 is a real server and ranks 1..N the
workers; the round is :mod:`gradsparse.distributed.server`'s (wire-format messages over Gloo
point-to-point ``send``/``recv``). Rank 0 (the server) writes the run directory; the workers
send it diagnostics after each message (not in the ledger).
The diagnostics are each worker's gradient, accumulated vector, feedback input and new
memory/momentum rows, so every metric is recorded as under ``sync``.

Diagnostics (replicated mode): the per-worker state (memory, momentum) and the raw gradients of all workers are
also all-gathered every round (d values per worker, not counted in the byte ledger, which
holds the messages only), so every metric, the run directory and the checkpoint are the same as
``sync``'s. Rank 0 writes the run directory (``python -m gradsparse.distributed.worker``).

Multi-machine runs: ``torchrun --nnodes M --nproc-per-node P --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m gradsparse.distributed.worker CONFIG --out DIR`` on every machine
(workers.count = M * P; GLOO_SOCKET_IFNAME names the interface).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..algorithm import ServerStepOutput, WorkerState, WorkerStepOutput
from ..distributed.exchange import all_gather_rows
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
        self.rank = dist.get_rank()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

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
        """[1, m] on every rank -> [N, m] (row q from rank q)."""
        t = row.reshape(-1).contiguous().to(self.device)
        out = [torch.empty_like(t) for _ in range(self.n_workers)]
        dist.all_gather(out, t)
        return torch.stack(out).cpu()

    def worker_round(self, w, t, lr):
        q = self.rank
        idx = self.data.sample()  # all workers' rows: the generator advances as in sync
        self.samples_seen += sum(len(r) for r in idx) if isinstance(idx, list) else idx.numel()
        rows = idx[q]
        x, y = self.task.train_x[rows], self.task.train_y[rows]
        g = self._grad(w, x, y)
        if self.x_star is not None:
            g = g - self._grad(self.x_star, x, y)
        fed = self.feedback_gradients(g[None], w)
        in_place = self.alg.supports_in_place and self.stagewise is None
        state_q = self.worker_state.rows(slice(q, q + 1))
        ids = self.worker_ids[q : q + 1]
        if in_place:
            out = self.alg.worker_step_in_place(fed, state_q, step=t, lr=lr, workers=ids)
        else:
            out = self.alg.worker_step(fed, w, state_q, step=t, lr=lr, workers=ids)
        ex = all_gather_rows([out.message], device=self.device)
        message = ex.gathered[0]
        if self.device.type != "cpu":
            message.offsets, message.values, message._indices = (message.offsets.cpu(), message.values.cpu(),
                                                                 message._indices.cpu())
        if out.message.dense:
            message.dense, message._indices = True, None
        nbytes = self._gather_rows(out.nbytes).to(torch.long)
        # diagnostics: every worker's gradient and new state on every rank (not in the ledger)
        grads = self._gather_rows(g)
        new = out.state

        def gathered(st):
            return None if st is None else SegmentedTensor(st.layout, self._gather_rows(st.flat).to(st.flat.dtype))

        compressor = None
        if new.compressor is not None:
            compressor = {k: self._gather_rows(v) for k, v in new.compressor.items()}
        state = WorkerState(gathered(new.memory), gathered(new.momentum), compressor)
        if in_place:  # keep the engine's own buffer (views of it stay current)
            for mine, full in ((self.worker_state.memory, state.memory),):
                mine.flat.copy_(full.flat)
            state.memory = self.worker_state.memory
        acc_values = all_gather_rows([out.message.with_values(out.feedback.accumulated_values)],
                                     device=self.device).gathered[0].values.cpu()
        accumulated = out.feedback.accumulated
        feedback = FeedbackOutput(message, acc_values, None if accumulated is None else self._gather_rows(accumulated))
        inputs = None if out.feedback_input is None else self._gather_rows(out.feedback_input)
        return grads, WorkerStepOutput(message, nbytes, state, feedback, inputs), self._renew_live_token() if in_place else [True]

    # ---- parameter-server mode (gradsparse.distributed.server) ---------------------------------
    def step(self):
        if not self.parameter_server:
            return super().step()
        from ..distributed import server as ps
        from .synchronous import StepRecord

        t, n = self.t, self.n_workers
        lr = float(self.schedule(t, self.epoch))
        w = self.w
        idx = self.data.sample()  # every rank draws all workers' rows: the streams stay in step with sync
        self.samples_seen += sum(len(r) for r in idx) if isinstance(idx, list) else idx.numel()
        d = self.d
        mem, mom = self.worker_state.memory, self.worker_state.momentum
        diag_width = d * (3 + (mem is not None) + (mom is not None))  # g, accumulated, feedback input, memory, momentum
        server_before = self.server_state
        if self.rank == 0:  # the server
            messages, charged = [], []
            grads, acc, fin = (torch.zeros(n, d, dtype=self.dtype) for _ in range(3))
            for q in range(n):
                batch, nbytes, _ = ps.recv_message(q + 1, step=t, dtype=self.dtype)
                diag = ps.recv_tensor(diag_width, self.dtype, q + 1, step=t)
                grads[q], acc[q], fin[q] = diag[:d], diag[d : 2 * d], diag[2 * d : 3 * d]
                off = 3 * d
                for st in (mem, mom):
                    if st is not None:
                        st.flat[q] = diag[off : off + d]
                        off += d
                messages.append(batch)
                charged.append(nbytes)
            message = SparseBatch.cat(messages)
            srv = self.alg.server_step(message, self.server_state, step=t, lr=lr, weights=self.weights)
            for q in range(n):
                ps.send_message(srv.message, q + 1, step=t, charged=srv.nbytes, extra=charged, kind=1)
            update, down_nbytes = srv.update, srv.nbytes
            up_nbytes = torch.tensor(charged, dtype=torch.long)
            self.server_state = srv.state
        else:  # worker q
            q = self.rank - 1
            rows = idx[q]
            x, y = self.task.train_x[rows], self.task.train_y[rows]
            g = self._grad(w, x, y)
            if self.x_star is not None:
                g = g - self._grad(self.x_star, x, y)
            state_q = self.worker_state.rows(slice(q, q + 1))
            ids = self.worker_ids[q : q + 1]
            if self.alg.supports_in_place:
                out = self.alg.worker_step_in_place(g[None], state_q, step=t, lr=lr, workers=ids)
            else:
                out = self.alg.worker_step(g[None], w, state_q, step=t, lr=lr, workers=ids)
                for mine, new in ((mem, out.state.memory), (mom, out.state.momentum)):
                    if mine is not None:
                        mine.flat[q] = new.flat[0]
                if out.state.compressor is not None:
                    for k, v in out.state.compressor.items():
                        self.worker_state.compressor[k][q] = v[0]
            ps.send_message(out.message, 0, step=t, charged=int(out.nbytes[0]))
            fin_q = out.feedback_input[0] if out.feedback_input is not None else g
            parts = [g, out.accumulated()[0], fin_q] + [st.flat[q] for st in (mem, mom) if st is not None]
            ps.send_tensor(torch.cat(parts).to(self.dtype), 0, step=t)
            down, down_nbytes, charged = ps.recv_message(0, step=t, n_extra=n, kind=1, dtype=self.dtype)
            up_nbytes = torch.tensor(charged, dtype=torch.long)
            if self.alg.topology.compresses_downlink:  # C_down(G): applied as is
                update = down.to_dense(self.dtype)[0]
                srv = ServerStepOutput(update, update, update, down, down_nbytes, self.server_state, self.weights)
            else:  # ps_uplink: the aggregate A; the same momentum and step size as the server
                a = down.to_dense(self.dtype)
                srv = self.alg.server_step(SparseBatch.from_dense(a), self.server_state, step=t, lr=lr,
                                           weights=torch.ones(1, dtype=self.dtype))
                update = srv.update
                self.server_state = srv.state
            message, grads, acc, fin = out.message, g[None], out.accumulated(), None
        self.w = w - update
        up, down_total = self.alg.topology.synchronous_traffic(up_nbytes, down_nbytes, n)
        self.ledger.add(up, down_total, n, n)
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
