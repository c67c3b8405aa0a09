"""Budget-threshold: a hard-threshold whose lambda tunes itself, per worker, to a byte budget."""

from __future__ import annotations

import math

import torch

from .. import kernels, wire
from ..constraints import Interval, check_all
from ..messages import SparseBatch
from ..segments import Layout
from ..wire import format as wire_format
from .base import Compressor


# ---- a hard-threshold that tunes itself to a byte budget (issue 11) -------------------------
class _ThresholdStep(Compressor):
    """One step of :class:`BudgetThreshold`: per row q and segment l keep ``|x_i| >= lam[q, l]``
    (NaN never passes); a row holding fewer than ``floors[q]`` is raised to its largest
    ``floors[q]``; a row holding more than ``limits[q]`` entries is cut to its largest
    ``limits[q]``; and a row whose worst-case frame could exceed ``avail[q]`` bytes (more than
    ``hard[q]`` entries) is cut to its largest c entries with c the largest count (searched by
    bisection from ``hard[q]``) whose exact frame fits ``avail[q]``. Stateless: built by
    :meth:`BudgetThreshold.for_step`."""

    kind = "budget_threshold_step"

    def __init__(self, lam: torch.Tensor, limits: list[int], hard: list[int], avail: list[int | None],
                 seg_sizes: list[int], value_dtype: str = "fp32", floors: list[int] | None = None,
                 first: list[list[int] | None] | None = None) -> None:
        self.lam, self.limits, self.hard, self.avail = lam, limits, hard, avail
        self.floors = floors or [0] * len(limits)
        #: rows without a lambda yet: per segment the count k_l to keep by exact top-k; the
        #: k_l-th largest magnitude of each segment is recorded in ``measured`` ([n, segments])
        self.first = first or [None] * len(limits)
        self.measured: torch.Tensor | None = None
        self.seg_sizes, self.value_dtype = seg_sizes, value_dtype

    def _fits(self, cols: torch.Tensor, d: int, avail: int) -> bool:
        row = torch.sort(cols).values
        one = SparseBatch(d, torch.tensor([0, row.numel()], dtype=torch.long), torch.zeros(row.numel()), row,
                          sorted_rows=True)
        return int(wire.encoded_nbytes(one, value_dtype=self.value_dtype)[0]) <= avail

    def compress(self, x, context=None):
        n, d = x.shape
        lam = self.lam.to(x.dtype)
        if lam.shape[1] == 1:
            mask = x.abs() >= lam
        else:
            sizes = torch.tensor(self.seg_sizes, dtype=torch.long)
            mask = x.abs() >= lam.repeat_interleave(sizes, dim=1)
        if any(f is not None for f in self.first):
            self.measured = torch.full((n, len(self.seg_sizes)), math.nan, dtype=torch.float64)
            bounds = [0]
            for size in self.seg_sizes:
                bounds.append(bounds[-1] + size)
            for q, ks in enumerate(self.first):
                if ks is None:
                    continue
                mask[q] = False
                for l, kl in enumerate(ks):
                    a, b = bounds[l], bounds[l + 1]
                    kl = min(kl, b - a)
                    if kl <= 0:
                        continue
                    cols = kernels.topk_indices_rows(x[q : q + 1, a:b], kl)[0] + a
                    mask[q, cols] = True
                    mags = x[q, cols].abs()
                    mags = mags[~torch.isnan(mags)]
                    if mags.numel():
                        self.measured[q, l] = float(mags.min())
        counts = mask.sum(1).tolist()
        for q in range(n):
            if counts[q] < self.floors[q]:  # must spend: the row's largest entries up to the floor
                mask[q] = False
                mask[q, kernels.topk_indices_rows(x[q : q + 1], self.floors[q])[0]] = True
                counts[q] = self.floors[q]
            c_hi = min(counts[q], self.limits[q])
            if counts[q] <= min(self.limits[q], self.hard[q]):
                continue
            keep = torch.where(mask[q], x[q], torch.zeros((), dtype=x.dtype))
            # the kept entries by magnitude, largest first (exact top-k order, ties -> lower index)
            order = kernels.topk_indices_rows(keep[None], c_hi)[0] if c_hi > 0 else torch.zeros(0, dtype=torch.long)
            if c_hi > 0:
                order = order[torch.argsort(-keep[order].abs(), stable=True)]
            c = c_hi
            if c_hi > self.hard[q]:  # the worst case may not fit: the largest prefix that does
                lo, hi = max(self.hard[q], 0), c_hi  # lo fits (worst case), find the largest fitting c
                if self._fits(order[:hi], d, self.avail[q]):
                    lo = hi
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if self._fits(order[:mid], d, self.avail[q]):
                        lo = mid
                    else:
                        hi = mid
                c = lo
            row = torch.zeros(d, dtype=torch.bool, device=x.device)
            row[order[:c]] = True
            mask[q] = row
        return SparseBatch.from_mask(x, mask)

    def describe(self):
        return f"threshold-step(lambda={self.lam.reshape(-1).tolist()}, limits={self.limits})"


class BudgetThreshold(Compressor):
    """Hard-threshold whose lambda tunes itself, per worker, to spend a total uplink budget.

    Give exactly one of ``budget_bytes`` (B: the most bytes one worker's uplink frames may add up
    to over the run, exact wire sizes) or ``density`` (rho: at most ``floor(rho d T)`` entries in
    total per worker, i.e. an average density rho). ``steps`` (T): the run's number of steps; in a
    config leave it out (``null``) and the runner fills in the run's length (``steps``, or the
    steps that ``epochs`` make); from Python pass it or call :meth:`bind_run`. Use it with
    ``feedback: ef-scaled`` for paper 002's hard-threshold with error feedback (lambda then lives
    on the gradient's scale), or any other feedback.

    Rule (each worker q alone, from what it has sent; state: spent S, steps done t, log lambda
    per segment, an estimate b of the bytes per kept entry). With R = T - t steps left:

    * **share** s = (B - S) / R: what this step may spend so the rest of the budget spreads
      evenly over the steps left (under- or over-spending so far changes later shares);
    * **send everything** when s is at least a full message (the dense frame, or d entries):
      lambda = 0, so a budget of T dense frames (or rho = 1) is the identity compressor; the last
      step (R = 1) also has lambda = 0: it spends what is left on its largest entries; and when
      M = B - S - (R - 1) x dense frame > 0 (what even dense messages on every later step could no
      longer spend), the step sends at least its largest ceil((M - E) / b) entries (a floor);
    * otherwise keep ``|x_i| >= lambda_l`` (segment l; one segment for ``scope: entire``) and cut
      the row to its largest ``cap`` entries when it holds more, with
      ``cap = min(hard, ceil(burst * K))``, K = (s - E) / b the entries the share buys (E: the
      empty frame) and **hard** the largest count whose worst-case frame (raw int32 indices and
      4-byte values, or the dense frame if smaller) fits ``B - S - (R - 1) E``, the bytes left
      once an empty frame is kept for each later step. The exact size is known only after
      compression (``observe`` adds it to S); since it never exceeds the worst case, S <= B after
      every step: the run never exceeds the budget, and its last steps send less rather than
      overshoot. In density mode the cost is the count, hard = entries left, and E = 0, b = 1;
    * **update** after the step (observe): with c_l the entries sent in segment l and
      K_l = K d_l / d its share, ``log lambda_l += eta_t * clip(log((c_l + 1) / (K_l + 1)), ±log 8)``,
      eta_t = max(gain_floor, gain / sqrt(1 + t)) (stochastic approximation: with i.i.d.
      gradients lambda settles where the expected count is K; the floor keeps it tracking a
      drifting distribution), and ``b <- 0.7 b + 0.3 (nbytes - E) / c`` when c > 0.

    lambda starts at ``threshold`` when given; else the first step keeps exactly its top K_0
    entries (per segment round(K_0 d_l / d), at least 1; K_0 the entries the first share buys at
    b_0 = 4 + 4 bytes per entry) and lambda_1 is, per segment, the smallest magnitude it kept
    (the step hands it from ``for_step``'s compressor to the same worker step's ``observe``).
    Later it moves by at most a factor 8^eta per step. Steps beyond T (a run longer than planned) send empty messages: each still
    costs an empty frame, so give ``steps`` >= the run's length (:meth:`bind_run` rejects less).
    The state (plain tensors, one row per worker) is checkpointed with the workers' state; a
    worker uses only its own state and messages, so it runs unchanged on every engine. Used
    statelessly (``compress`` outside a step, e.g. a diagnostic) it applies the first step's rule.
    """

    kind = "budget_threshold"
    plans_over_run = True
    CONSTRAINTS = {
        "budget_bytes": Interval(0, None, integer=True, optional=True),  # total bytes per worker
        "density": Interval(0.0, 1.0, closed="right", optional=True),
        "steps": Interval(1, None, integer=True, optional=True),  # null: the run's steps
        "threshold": Interval(0.0, None, closed="neither", optional=True),  # the initial threshold
        "gain": Interval(0.0, 2.0), "gain_floor": Interval(0.0, 2.0),
        "burst": Interval(1.0, None, optional=True),  # null: no burst cap
    }
    #: worst-case value bytes per entry (fp32; fp16/bf16 frames are smaller)
    _BOUND_VALUE_BYTES = 4

    def __init__(
        self,
        budget_bytes: int | None = None,
        density: float | None = None,
        steps: int | None = None,
        scope: str = "entire",
        threshold: float | None = None,
        gain: float = 0.5,
        gain_floor: float = 0.05,
        burst: float | None = 4.0,
        layout: Layout | None = None,
    ) -> None:
        if (budget_bytes is None) == (density is None):
            raise ValueError("budget_threshold needs exactly one of budget_bytes (total bytes per worker) or density")
        check_all(self.kind, self.CONSTRAINTS, {"budget_bytes": budget_bytes, "density": density, "steps": steps})
        if scope not in ("entire", "layerwise"):
            raise ValueError(f"budget_threshold scope must be 'entire' or 'layerwise', got {scope!r}")
        if scope == "layerwise" and layout is None:
            raise ValueError("budget_threshold scope 'layerwise' needs the model's layout")
        check_all(self.kind, self.CONSTRAINTS, {"threshold": threshold, "gain": gain, "gain_floor": gain_floor,
                                                "burst": burst})
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.density = None if density is None else float(density)
        self.steps = steps
        self.scope, self.layout = scope, layout
        self.threshold = None if threshold is None else float(threshold)
        self.gain, self.gain_floor = float(gain), float(gain_floor)
        self.burst = None if burst is None else float(burst)
        self.value_bytes, self.value_dtype = self._BOUND_VALUE_BYTES, "fp32"
        #: each worker's own number of steps (messages), when it differs from ``steps``: the
        #: asynchronous engine, where ``steps`` counts server updates (see :meth:`bind_run`)
        self.worker_steps: list[int] | None = None
        #: per worker: messages beyond ``worker_steps`` it may still have to send (a plan that is
        #: an estimate); an empty frame is kept back for each, so the budget holds even then
        self.reserve_messages: list[int] | None = None

    @classmethod
    def from_config(cls, options, layout, base_lr=None):
        return cls(layout=layout, **options)

    def bind_run(self, steps: int, value_dtype: str | None = None, worker_steps: list[int] | None = None,
                 reserve_messages: list[int] | None = None) -> None:
        """Called by the runner with the run's number of steps (and the wire's value dtype, which
        tightens the worst-case frame). Fills in ``steps`` when not given; rejects fewer steps than
        the run has (the extra steps' empty frames would not fit the budget).

        ``worker_steps``: how many messages each worker will send, when that is not ``steps``
        (the asynchronous engine: ``steps`` server updates, of which each worker computes its
        share, planned from the event trace by
        :meth:`gradsparse.engines.async_sim.AsyncSimulator.planned_messages`). Each worker then
        spreads its budget over its own messages (``density``: ``floor(rho d T_q)`` entries),
        instead of over ``steps`` (which spent about 1/N of it). ``reserve_messages``: when the
        plan is an estimate, how many more messages each worker may send; an empty frame is
        kept back for each (messages past the plan are empty)."""
        if self.steps is None:
            self.steps = int(steps)
        elif self.steps < steps:
            raise ValueError(f"budget_threshold steps = {self.steps} is fewer than the run's {steps} steps "
                             "(leave it out to use the run's length)")
        if worker_steps is not None:
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in worker_steps):
                raise ValueError(f"budget_threshold worker_steps must be integers >= 0, got {worker_steps!r}")
            self.worker_steps = [int(t) for t in worker_steps]
        if reserve_messages is not None:
            self.reserve_messages = [max(0, int(m)) for m in reserve_messages]
        if value_dtype is not None:
            self.value_bytes = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}[value_dtype]
            self.value_dtype = value_dtype
        if self.layout is not None and self.layout.d < (1 << 40):  # d known: check the budget now
            ids = None if self.worker_steps is None else list(range(len(self.worker_steps)))
            self._plan(self.init_state(self.layout, 1 if ids is None else len(ids)), self.layout.d, ids)

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def bytes_mode(self) -> bool:
        return self.budget_bytes is not None

    def _sizes(self, d: int) -> tuple[int, int]:
        """(empty frame, dense frame) in bytes for rows of length d (exact, from the wire)."""
        cached = getattr(self, "_size_cache", None)
        if cached is not None and cached[0] == (d, self.value_bytes):
            return cached[1]
        no_entries = SparseBatch(d, torch.zeros(2, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long))
        empty = int(wire.encoded_nbytes(no_entries)[0])
        dense = int(wire_format.frame_nbytes(d, d, "dense", False, 0, d * self.value_bytes))
        self._size_cache = ((d, self.value_bytes), (empty, dense))
        return empty, dense

    def _bound(self, d: int, c: int) -> int:
        """An upper bound on the frame of any c-entry row (what ``auto`` picks is never larger)."""
        vb = self.value_bytes
        if d < wire_format.RAW32_LIMIT:
            sparse = wire_format.frame_nbytes(d, c, "raw32", False, 4 * c, vb * c)
        else:
            ib = c * wire_format.uvarint_len(d)
            sparse = wire_format.frame_nbytes(d, c, "varint", False, ib, vb * c)
        return int(min(sparse, self._sizes(d)[1]))

    def _hard_count(self, d: int, avail: int) -> int:
        """The largest c <= d whose worst-case frame fits ``avail`` bytes (-1: not even an empty one)."""
        if self._bound(d, 0) > avail:
            return -1
        if self._bound(d, d) <= avail:
            return d
        per = 4 + self.value_bytes
        c = max(0, min(d, (avail - 40) // per))
        while c > 0 and self._bound(d, c) > avail:
            c -= 1
        while c < d and self._bound(d, c + 1) <= avail:
            c += 1
        return c

    # ---- state ------------------------------------------------------------------------------
    def _segments(self, d: int) -> list[int]:
        if self.scope == "entire":
            return [d]
        if self.layout.d != d:
            raise ValueError(f"layer-wise budget_threshold built for d = {self.layout.d} got rows of d = {d}")
        return [b - a for _, a, b in self.layout.bounds()]

    def init_state(self, layout, n):
        if self.layout is None:  # scope entire: only d is needed, taken from the model it runs on
            self.layout = layout
        n_seg = 1 if self.scope == "entire" else len(layout.sizes)
        return {
            "spent": torch.zeros(n, dtype=torch.long),  # bytes (or entries) sent so far
            "steps_done": torch.zeros(n, dtype=torch.long),
            "log_threshold": torch.full((n, n_seg), math.nan, dtype=torch.float64),  # nan: not yet set
            "bytes_per_entry": torch.full((n,), math.nan, dtype=torch.float64),
        }

    def steps_of(self, worker: int | None) -> int:
        """The steps worker ``worker`` plans over: its own (``worker_steps``) or the run's."""
        if self.worker_steps is not None and worker is not None:
            if not 0 <= worker < len(self.worker_steps):
                raise ValueError(f"budget_threshold has a plan for {len(self.worker_steps)} workers, not worker {worker}")
            return self.worker_steps[worker]
        return self.steps

    def _total(self, d: int, steps: int) -> int:
        return self.budget_bytes if self.bytes_mode else math.floor(self.density * d * steps)

    def _plan(self, state: dict[str, torch.Tensor], d: int, workers: list[int] | None = None) -> dict:
        """Per row: share, the entries it buys (K), whether the step sends everything, the cap,
        and the thresholds (see the class docstring). ``workers``: the rows' worker ids (for
        ``worker_steps``; None: rows 0..n-1)."""
        if self.steps is None:
            raise ValueError("budget_threshold needs steps (the run's number of steps): pass steps=, "
                             "or run it from a config, where the runner fills it in")
        n = state["spent"].shape[0]
        ids = list(range(n)) if workers is None else workers
        empty, dense = self._sizes(d) if self.bytes_mode else (0, d)
        b0 = float(4 + self._BOUND_VALUE_BYTES) if self.bytes_mode else 1.0
        shares, ks, send_all, limits, hards, avails, floors = [], [], [], [], [], [], []
        for q in range(n):
            worker = ids[q] if self.worker_steps is not None else None
            steps = self.steps_of(worker)
            reserve = self.reserve_messages[worker] if self.reserve_messages is not None and worker is not None else 0
            total = self._total(d, steps) - reserve * empty
            if total < steps * empty:
                who = f"worker {ids[q]}'s {steps} messages" if self.worker_steps is not None else f"the run's {steps} steps"
                raise ValueError(f"budget_bytes = {total} is below the empty frames of {who} "
                                 f"({steps} x {empty} bytes): every step sends at least an empty frame")
            spent, t = int(state["spent"][q]), int(state["steps_done"][q])
            b = float(state["bytes_per_entry"][q])
            b = b0 if math.isnan(b) or not self.bytes_mode else b
            left, r = total - spent, steps - t
            if r <= 0:  # past the planned steps: nothing more
                shares.append(0.0), ks.append(0.0), send_all.append(False)
                limits.append(0), hards.append(0), avails.append(None), floors.append(0)
                continue
            share = left / r
            k = max(0.0, (share - empty) / b)
            if self.bytes_mode:
                avail = left - (r - 1) * empty
                hard = max(0, self._hard_count(d, avail))
            else:
                avail, hard = None, int(min(d, max(left, 0)))
            full = share >= dense or r == 1  # the last step spends what is left on its largest entries
            limit = d if (full or self.burst is None) else max(1, math.ceil(self.burst * k))
            if not self.bytes_mode:
                limit = min(limit, hard)
            # must spend: what even full messages on every later step could not use any more
            must = left - (r - 1) * dense
            floor = 0 if full or must <= 0 else min(d, hard, math.ceil((must - empty) / b))
            shares.append(share), ks.append(k), send_all.append(full)
            limits.append(int(min(max(limit, floor), d))), hards.append(hard), avails.append(avail), floors.append(int(floor))
        log_lam = state["log_threshold"].clone()
        sizes = self._segments(d)
        first: list[list[int] | None] = [None] * n
        for q in range(n):
            if math.isnan(float(log_lam[q, 0])):
                if self.threshold is not None:  # the given starting lambda
                    log_lam[q] = math.log(self.threshold)
                else:  # no lambda yet: this step keeps the top K_l per segment and measures lambda
                    first[q] = [max(1, round(ks[q] * dl / d)) for dl in sizes]
                    log_lam[q] = 0.0  # unused (lambda = 0 below; observe sets the measured one)
        lam = torch.exp(log_lam)
        for q in range(n):
            if first[q] is not None:
                lam[q] = 0.0
        for q in range(n):
            if send_all[q]:
                lam[q] = 0.0
        return {"share": shares, "k": ks, "send_all": send_all, "limits": limits, "hard": hards, "avail": avails,
                "floors": floors, "first": [None if send_all[q] else first[q] for q in range(n)],
                "log_threshold": log_lam, "lam": lam}

    def _step(self, plan: dict, d: int) -> _ThresholdStep:
        return _ThresholdStep(plan["lam"], plan["limits"], plan["hard"], plan["avail"], self._segments(d), self.value_dtype,
                              plan["floors"], plan["first"])

    def for_step(self, state, context):
        d = self.layout.d if self.layout is not None else None
        if d is None:
            raise ValueError("budget_threshold needs the model's layout (built from a config, or pass layout=)")
        step = self._step(self._plan(state, d, self._ids(state, context)), d)
        # the step that measures a first lambda hands it to the observe of the same worker step
        self._measuring = step if any(f is not None for f in step.first) else None
        return step

    def _ids(self, state, context) -> list[int] | None:
        """The rows' worker ids when the plan is per worker (None otherwise)."""
        if self.worker_steps is None:
            return None
        n = state["spent"].shape[0]
        return context.worker_ids(n) if context is not None else list(range(n))

    def observe(self, state, message, nbytes, context):
        d = message.d
        ids = self._ids(state, context)
        plan = self._plan(state, d, ids)
        sizes = self._segments(d)
        n = message.n
        counts = message.counts.to(torch.long)
        if len(sizes) == 1:
            seg_counts = counts[:, None].to(torch.float64)
        else:
            bounds = torch.cumsum(torch.tensor(sizes, dtype=torch.long), 0)[:-1]
            seg = torch.bucketize(message.indices, bounds, right=True)
            seg_counts = torch.zeros(n * len(sizes), dtype=torch.float64)
            seg_counts.index_add_(0, message.row_ids() * len(sizes) + seg, torch.ones(seg.numel(), dtype=torch.float64))
            seg_counts = seg_counts.view(n, len(sizes))
        cost = nbytes.to(torch.long) if self.bytes_mode else counts
        empty = self._sizes(d)[0] if self.bytes_mode else 0
        log_lam = plan["log_threshold"].clone()
        measuring, self._measuring = getattr(self, "_measuring", None), None
        bpe = state["bytes_per_entry"].clone()
        frac = torch.tensor(sizes, dtype=torch.float64) / d
        for q in range(n):
            t = int(state["steps_done"][q])
            if plan["first"][q] is not None:  # lambda_1: the measured K_l-th magnitudes (else unset)
                got = measuring.measured[q] if measuring is not None and measuring.measured is not None and measuring.measured.shape[0] == n else None
                if got is None or bool(torch.isnan(got).all()) or bool((got <= 0).any()):
                    log_lam[q] = math.nan
                else:
                    fill = got[~torch.isnan(got)].min()
                    log_lam[q] = torch.log(torch.where(torch.isnan(got), fill, got))
            elif not plan["send_all"][q] and t < self.steps_of(None if ids is None else ids[q]) - 1:
                eta = max(self.gain_floor, self.gain / math.sqrt(1.0 + t))
                target = plan["k"][q] * frac
                u = torch.log((seg_counts[q] + 1.0) / (target + 1.0)).clamp(-math.log(8.0), math.log(8.0))
                log_lam[q] = log_lam[q] + eta * u
            c = int(counts[q])
            if self.bytes_mode and c > 0:
                per = (int(nbytes[q]) - empty) / c
                bpe[q] = per if math.isnan(float(bpe[q])) else 0.7 * float(bpe[q]) + 0.3 * per
        return {
            "spent": state["spent"] + cost,
            "steps_done": state["steps_done"] + 1,
            "log_threshold": log_lam,
            "bytes_per_entry": bpe,
        }

    def compress(self, x, context=None):
        n, d = x.shape
        layout = self.layout if self.layout is not None else Layout.flat(d)
        state = self.init_state(layout, n)
        return self._step(self._plan(state, d), d).compress(x, context)

    def thresholds(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n, segments] the lambda each worker's next step uses (0 where it sends everything)."""
        ids = None if self.worker_steps is None else list(range(state["spent"].shape[0]))
        return self._plan(state, self.layout.d, ids)["lam"]

    def budget_for(self, d: int, worker: int | None = None) -> int:
        """The budget of worker ``worker`` (any worker when the plan is not per worker) in its
        unit (bytes, or entries in density mode)."""
        if self.bytes_mode:
            return self.budget_bytes
        if self.steps is None:
            raise ValueError("budget_threshold needs steps")
        return self._total(d, self.steps_of(worker))

    def budget_summary(self, engine) -> dict:
        """What a run's ``summary.json`` records under ``uplink_budget``: the budget per worker and
        in total, what each worker spent (same unit), and the thresholds its next step would use;
        with a per-worker plan (engine async) also each worker's planned messages."""
        state = engine.worker_state.compressor
        unit = "bytes" if self.bytes_mode else "entries"
        n = int(state["spent"].numel())
        budgets = [self.budget_for(engine.d, q) for q in range(n)]
        out = {
            "unit": unit, "per_worker": budgets[0] if len(set(budgets)) == 1 else budgets, "total": sum(budgets),
            "spent_per_worker": state["spent"].tolist(), "spent_total": int(state["spent"].sum()),
            "steps": self.steps, "scope": self.scope,
            "final_thresholds": torch.exp(state["log_threshold"]).tolist(),
        }
        if self.worker_steps is not None:
            out["planned_messages_per_worker"] = list(self.worker_steps)
            out["messages_per_worker"] = state["steps_done"].tolist()
        return out

    def describe(self):
        amount = f"budget_bytes={self.budget_bytes}" if self.bytes_mode else f"density={self.density:g}"
        return f"budget-threshold({amount}, steps={self.steps}, {self.scope})"
