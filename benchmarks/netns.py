"""Hosts on one machine for measuring real traffic: network namespaces on a bridge.

``Net(ranks)`` makes a hub namespace holding a bridge and, for each rank, a namespace whose
``eth0`` (``SUBNET.(r + 1)/24``) is one end of a veth pair whose other end is a bridge port;
``shape(rate)`` limits each rank's egress with ``tc tbf`` (``"none"``: unshaped); ``tx_bytes(r)``
reads the kernel's TX counter of rank r's ``eth0`` (what crossed the link, headers included);
``down()`` deletes exactly the namespaces it made (the veths and the bridge go with them). Every
name starts with ``gsbn<pid>-``. Inside a namespace (``ip netns exec``), a process reads its own
counter at ``/sys/class/net/eth0/statistics/tx_bytes``.

``can_run()`` says why namespaces cannot be used here (not root, no ``ip``/``tc``, no permission),
or ``None``. Used by ``benchmarks/bench_network.py`` and ``tests/test_network.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

PREFIX = f"gsbn{os.getpid() % 100000}-"
SUBNET = "10.213.0"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Net:
    def __init__(self, ranks: int, prefix: str = PREFIX) -> None:
        self.ranks = ranks
        self.hub = prefix + "hub"
        self.ns = [f"{prefix}r{r}" for r in range(ranks)]
        self.made: list[str] = []

    def address(self, r: int) -> str:
        return f"{SUBNET}.{r + 1}"

    def up(self) -> "Net":
        sh("ip", "netns", "add", self.hub)
        self.made.append(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")
        for r, ns in enumerate(self.ns):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", self.hub, "link", "add", f"v{r}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", self.hub, "link", "set", f"v{r}", "master", "br0")
            sh("ip", "-n", self.hub, "link", "set", f"v{r}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.address(r)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def shape(self, rate: str) -> None:
        for ns in self.ns:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root", check=False)
            if rate != "none":
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                   "rate", rate, "burst", "512kb", "latency", "200ms")

    def tx_bytes(self, r: int) -> int:
        out = sh("ip", "-n", self.ns[r], "-s", "-j", "link", "show", "eth0").stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def exec_prefix(self, r: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns[r]]

    def down(self) -> None:
        for ns in reversed(self.made):  # only what this run created, by name
            sh("ip", "netns", "del", ns, check=False)
        self.made.clear()

    def __enter__(self) -> "Net":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()


def can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the '{tool}' command (iproute2)"
    probe = PREFIX + "probe"
    r = sh("ip", "netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


def own_tx_bytes(interface: str = "eth0") -> int:
    """This process's namespace's TX counter of ``interface`` (inside ``ip netns exec``)."""
    with open(f"/sys/class/net/{interface}/statistics/tx_bytes") as f:
        return int(f.read())
