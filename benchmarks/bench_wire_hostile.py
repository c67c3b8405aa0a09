"""Decoding hostile wire input (issue 23): CPU seconds of one ``wire.decode`` of buffers built to be
slow (many one-entry frames of every encoding, one large seed frame whose support is regenerated
over d = 16k - 1 columns), as bytes per second, the best of ``--repeats`` decodes.

    python benchmarks/bench_wire_hostile.py [--mb 1] [--repeats 3] [--only seed_large,varint]

Times are ``time.process_time`` (CPU time of this process: less sensitive to a loaded machine than
wall time); peak RSS is the process's, reported after each case.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from gradsparse import wire
from gradsparse.messages import SparseBatch
from gradsparse.wire import format as wf


def _row(d, cols, dtype=torch.float16, dense=False):
    k = d if dense else len(cols)
    return SparseBatch(d, torch.tensor([0, k]), torch.zeros(k, dtype=dtype), None if dense else torch.tensor(cols, dtype=torch.long),
                       dense=dense)


def buffers(mb: float) -> dict[str, bytes]:
    size = int(mb * 1e6)
    k = size // 2
    out = {f"one seed frame, fp16, k = {k}, d = {16 * k - 1}": wf.write_frame(16 * k - 1, k, "seed", 1, None, 12345,
                                                                           b"", bytes(2 * k))}
    small = {
        "seed": wf.write_frame((1 << 31) - 1, 1, "seed", 1, None, 7, b"", b"\0\0"),
        "varint": wire.encode(_row(1000, [5]), index_encoding="varint"),
        "rice": wire.encode(_row(1000, [5]), index_encoding="rice"),
        "packed": wire.encode(_row(1000, [5]), index_encoding="packed"),
        "raw32": wire.encode(_row(1000, [5]), index_encoding="raw32"),
        "bitmap": wire.encode(_row(8, [5]), index_encoding="bitmap"),
        "dense": wire.encode(_row(1, [], dense=True), index_encoding="dense"),
        "empty": wire.encode(_row(1000, []), index_encoding="varint"),
    }
    for name, frame in small.items():
        n = size // len(frame)
        out[f"{n} one-entry {name} frames ({len(frame)} B)" if name != "empty" else f"{n} empty frames"] = frame * n
    k = size // 4
    out[f"one varint frame of {k} entries"] = wire.encode(_row(1 << 30, list(range(0, (1 << 30), (1 << 30) // k))[:k]),
                                                         index_encoding="varint")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated substrings of the case names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    only = args.only.split(",") if args.only else None
    print(f"{'buffer':58s} {'MB':>6s} {'CPU s':>7s} {'MB/s':>8s} {'peak RSS':>9s}")
    for name, buf in buffers(args.mb).items():
        if only and not any(o in name for o in only):
            continue
        best = float("inf")
        for _ in range(args.repeats):
            t = time.process_time()
            wire.decode(buf)
            best = min(best, time.process_time() - t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{name:58s} {len(buf) / 1e6:6.2f} {best:7.2f} {len(buf) / best / 1e6:8.3f} {rss:7.2f}GB", flush=True)


if __name__ == "__main__":
    main()
