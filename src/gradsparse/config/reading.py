"""Reading a run configuration: a YAML file (or a dict) and ``--set`` overrides, checked for
what YAML lets through (duplicate keys, non-finite numbers, integers beyond 64 bits, aliases that
expand without bound, exponent-form numbers YAML 1.1 reads as text), then validated against the
schema. Every problem is a :class:`ConfigError` of one line naming the dotted key, the value given
and what is allowed; nothing is written before validation succeeds."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .fields import INT_MAX
from .schema import RunConfig


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


#: a number in exponent form that YAML 1.1 (what PyYAML reads) takes for text: 1e-2, 1E3, 1.0e5,
#: 5.e3 (YAML 1.1 wants a dot and a signed exponent, e.g. 1.0e-2; YAML 1.2 and JSON read these as numbers)
EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
#: option names whose values are text even when they look like numbers (names, paths)
_TEXT_OPTION = re.compile(r"(^name$|path$|dir$|file$|dataset$)")


def numbers_in_exponent_form(node: Any, key: str = "") -> Any:
    """The raw config with every value written as a number in exponent form (``1e-2``, ``1E3``,
    ``1.0e5``) made a number, as YAML 1.2 reads it: an int when it is whole, written without a
    dot and fits in 64 bits (``1e4`` -> 10000), else a float. Names and paths stay text."""
    if isinstance(node, dict):
        return {k: numbers_in_exponent_form(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [numbers_in_exponent_form(v, key) for v in node]
    if isinstance(node, str) and not _TEXT_OPTION.search(key) and EXPONENT_NUMBER.fullmatch(node.strip()):
        text = node.strip()
        value = float(text)
        mantissa, exponent = re.split("[eE]", text)
        if "." not in mantissa and int(exponent) >= 0 and math.isfinite(value):
            whole = int(mantissa) * 10 ** int(exponent)
            if -INT_MAX - 1 <= whole <= INT_MAX:
                return whole
        return value
    return node


def _config_key(loc: tuple) -> str:
    """pydantic's error location as the dotted config key (``workers.weights[1]``); a union's
    member (int, float, literal['full'], ...) is pydantic's detail, not part of the key."""
    key = ""
    for p in loc:
        if isinstance(p, int):
            key += f"[{p}]"
        elif not (p.startswith(("function-after", "literal[")) or p in ("int", "float", "str", "bool")):
            key += f".{p}" if key else p
    return key


def _fmt_error(err: ValidationError) -> str:
    errors = err.errors()
    e = errors[0]
    loc = _config_key(e["loc"])
    # a union (``int | 'full'``) fails once per member: say every form that is allowed
    msgs = []
    for other in errors:
        if _config_key(other["loc"]) == loc and other["msg"] not in msgs:
            msgs.append(other["msg"])
    msg = " or ".join(m[len("Value error, "):] if m.startswith("Value error, ") else m for m in msgs)
    val = e.get("input")
    where = f"config key '{loc}'" if loc else "config"
    if e["type"] == "extra_forbidden":
        return f"{where}: unknown key (value {val!r}); check the spelling against the documented schema"
    if isinstance(val, dict):
        return f"{where}: {msg}"
    if isinstance(val, str) and re.fullmatch(r"[+-]?\d+(\.\d*)?[eE][+-]?\d+", val.strip()):
        msg += f" (YAML reads {val} as text: write it with a dot, e.g. {float(val):.1e}, or as digits)"
    shown = repr(val)
    if len(shown) > 120:
        shown = shown[:100] + "..."
    return f"{where}: invalid value {shown}: {msg}"


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: the parser's problem and where (line/column, 1-based)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the YAML
    spec forbids it; PyYAML would silently keep the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # the keys written here (a '<<' merge may be overridden)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def parse_yaml_value(text: str, key: str = "", label: str = "override") -> Any:
    """One value of ``--set key=VALUE`` (or of ``--grid``), read as YAML."""
    try:
        return _load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} {key}={text!r} is not valid YAML: {_yaml_problem(exc)}") from None


#: a raw config nests at most this deep and holds at most this many values (YAML aliases
#: expand: ``a: &a [*a]`` is infinitely deep, nine nested lists of nine aliases are 9**9 values)
MAX_DEPTH = 64
MAX_VALUES = 1_000_000


def check_numbers(node: Any, where: str = "", _seen: list | None = None, _depth: int = 0) -> None:
    """Every number in a raw config is finite and every integer fits in 64 bits (names the key);
    the config is not nested deeper than MAX_DEPTH nor holds more than MAX_VALUES values."""
    seen = [0] if _seen is None else _seen
    seen[0] += 1
    if seen[0] > MAX_VALUES:
        raise ConfigError(f"config holds more than {MAX_VALUES} values (YAML aliases expanding?); "
                          f"a config is a small mapping (at '{where or 'config'}')")
    if _depth > MAX_DEPTH:
        raise ConfigError(f"config key '{where[:80]}...' nests deeper than {MAX_DEPTH} levels "
                          "(a YAML alias that refers to itself?)")
    if isinstance(node, dict):
        for k, v in node.items():
            check_numbers(v, f"{where}.{k}" if where else str(k), seen, _depth + 1)
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            check_numbers(v, f"{where}[{i}]", seen, _depth + 1)
    elif isinstance(node, bool):
        return
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key '{where or 'config'}': invalid value {node!r}: must be a finite number")
    elif isinstance(node, int) and not -INT_MAX - 1 <= node <= INT_MAX:
        raise ConfigError(
            f"config key '{where or 'config'}': invalid value {node}: integers must lie in -2**63..2**63-1"
        )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML scalars/lists)."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override key {key!r} is not a dotted key")
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: '{p}' holds a value, not a section")
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = parse_yaml_value(text, key.strip())
    return raw


def load_config(source: str | Path | dict, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or a dict), apply overrides, validate. Raises ConfigError."""
    if isinstance(source, dict):
        raw = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (or is not a regular file)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {exc.strerror}") from None
        if len(data) > 16 << 20:
            raise ConfigError(f"config file {str(path)!r} is {len(data)} bytes; a config is at most 16 MiB")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {str(path)!r} is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
            ) from None
        if "\x00" in text:
            raise ConfigError(f"config file {str(path)!r} is binary (NUL byte at offset {text.index(chr(0))}), not YAML")
        try:
            raw = _load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from None
        except RecursionError:
            raise ConfigError(f"config file {str(path)!r} nests too deeply") from None
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level, not {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    check_numbers(raw)  # first: it bounds the depth and size that the next walk visits
    raw = numbers_in_exponent_form(raw)
    check_numbers(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_fmt_error(err)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
