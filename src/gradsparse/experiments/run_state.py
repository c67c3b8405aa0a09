"""Who a run is and what it carries across a resume.

**Identity.** A run draws its run id (32 hex digits) when it starts; a resumed run keeps it. The id
heads the run directory's ``config.yaml`` (a YAML comment: the file still loads as a config),
stands in ``summary.json`` and in the checkpoint, so ``--resume`` can refuse a checkpoint copied
from another run. The checkpoint also holds the resolved config it was written with:
:func:`config_differences` names each key an edited ``config.yaml`` changed (refused unless
``--allow-config-change``, then recorded in ``summary.json``'s ``config_changes``), and
``summary.json`` carries the config's :func:`config_sha256`.

**Resumable state.** :class:`RunState` is what the runner itself checkpoints beside the engine's
own state_dict (under the key ``"runner"``): the metric rows, the running maxima, the skipped
messages and the wall time so far.
"""

from __future__ import annotations

import hashlib
import re
import uuid

import yaml

from ..config import ConfigError

#: the first line of a run directory's config.yaml (a YAML comment: the file still loads as a config)
CONFIG_HEADER = "# gradsparse run {run_id}: the resolved config of this run (gradsparse run --resume refuses " \
                "an edited copy unless --allow-config-change)\n"
_RUN_ID_LINE = re.compile(r"^# gradsparse run ([0-9a-f]{32})\b")


def run_id_of_config(text: str) -> str | None:
    """The run id in a run directory's config.yaml (its first line), or None."""
    m = _RUN_ID_LINE.match(text)
    return m.group(1) if m else None


def config_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_differences(before: str, after: str) -> dict[str, list]:
    """The dotted keys whose values differ between two resolved configs: key -> [before, after]."""

    def flat(node, prefix=""):
        if isinstance(node, dict) and node:
            out = {}
            for k, v in node.items():
                out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
            return out
        return {prefix: node}

    a, b = flat(yaml.safe_load(before) or {}), flat(yaml.safe_load(after) or {})
    return {k: [a.get(k), b.get(k)] for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


def describe_changes(changes: dict[str, list]) -> str:
    """``key before -> after, ...``: the changes of :func:`config_differences` in one line."""
    return ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items())


class RunState:
    """What the runner itself must carry across a resume (the engine has its own state_dict):
    the metric rows, running maxima, skipped messages, wall time, and who the run is: its run id
    (drawn when the run starts; also in config.yaml and summary.json), the resolved config the
    checkpoint was written with, and the config changes allowed on resume."""

    def __init__(self, columns) -> None:
        self.columns = list(columns)
        self.rows: list[dict] = []
        self.rr_rows: list[dict] = []
        self.worker_rows: list[dict] = []
        self.maxima: dict = {}
        self.skipped = 0
        self.wall = 0.0
        self.run_id: str = uuid.uuid4().hex
        self.config: str | None = None
        self.config_changes: list[dict] = []

    def state_dict(self) -> dict:
        return {"columns": self.columns, "rows": self.rows, "rr_rows": self.rr_rows, "worker_rows": self.worker_rows,
                "maxima": dict(self.maxima), "skipped_messages": self.skipped, "wall_seconds": self.wall,
                "run_id": self.run_id, "config": self.config, "config_changes": list(self.config_changes)}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["columns"]) != self.columns:
            raise ConfigError(f"checkpoint metric columns {sd['columns']} differ from the config's {self.columns}")
        self.rows, self.rr_rows, self.worker_rows = list(sd["rows"]), list(sd["rr_rows"]), list(sd["worker_rows"])
        self.maxima = dict(sd["maxima"])
        self.skipped, self.wall = int(sd["skipped_messages"]), float(sd["wall_seconds"])
        if sd.get("run_id"):
            self.run_id = str(sd["run_id"])
        self.config_changes = list(sd.get("config_changes") or [])
