"""What the DDP hook reports as sent is what the kernel sent: 3 ranks in network namespaces on a
bridge (needs root, iproute2; skipped otherwise), each rank's ``sent_bytes`` against its own
``eth0`` TX counter (headers, Gloo's protocol and TCP acknowledgements included), for each
collective (all-gather of frames, the owners' push and pull, the all-reduce of k values)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("gradsparse_netns", HERE.parent / "benchmarks" / "netns.py")
netns = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(netns)

RANKS = 3


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    why = netns.can_run()
    if why:
        pytest.skip(f"network namespaces: {why}")
    tmp = tmp_path_factory.mktemp("network")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    port = 29400 + os.getpid() % 500
    with netns.Net(RANKS, prefix=f"gstn{os.getpid() % 100000}-") as net:
        procs = [subprocess.Popen(net.exec_prefix(r) + [sys.executable, str(HERE / "_network_worker.py"), str(r), str(RANKS),
                                                        net.address(0), str(port), str(tmp / f"rank{r}.json")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(RANKS)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=400)[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(RANKS)]


@pytest.mark.parametrize("method", ["topk1", "topk1_fp16", "hard_threshold", "identity", "topk1_sharded",
                                    "topk1_sharded_bidirectional", "randomk_allreduce"])
def test_reported_bytes_are_within_5_percent_of_the_kernels_tx_counter(measured, method):
    for r in range(RANKS):
        got = measured[r][method]
        assert got["sent"] > 100_000  # large enough that the per-message overheads are small
        assert 0.95 <= got["sent"] / got["tx"] <= 1.05, (r, got)
    if method == "identity":  # dense messages go as a ring all-reduce
        assert all(measured[r][method]["dense_fallbacks"] > 0 for r in range(RANKS))
    else:
        assert all(measured[r][method]["dense_fallbacks"] == 0 for r in range(RANKS))


def test_fp16_values_halve_the_value_bytes(measured):
    for r in range(RANKS):
        fp32, fp16 = measured[r]["topk1"]["sent"], measured[r]["topk1_fp16"]["sent"]
        assert 0.55 * fp32 < fp16 < 0.8 * fp32  # 4 -> 2 bytes per value, indices unchanged
