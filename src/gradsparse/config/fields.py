"""The schema's building blocks: the strict base of every config section (no unknown keys, no
true/false where a number is wanted, no NaN or infinity), the run name's rule, and how a
section's allowed values and options come from the component tables."""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, field_validator


def _admits_bool(annotation) -> bool:
    """Whether a field's type takes true/false (``bool``, ``Any``, or a union holding one)."""
    if annotation is bool or annotation is Any:
        return True
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in get_args(annotation))
    return any(_admits_bool(a) for a in get_args(annotation))


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) if get_args(annotation) == () else str(annotation).replace("typing.", "")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, v, info):
        """true/false is not a number: pydantic would read ``steps: true`` as 1 (and a list of
        booleans as 0/1 weights); only fields typed bool take them."""
        flags = isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v))
        if flags:
            ann = cls.model_fields[info.field_name].annotation
            if not _admits_bool(ann):
                raise ValueError(f"true/false is not allowed here; expected {_type_name(ann)}")
        return v

#: integers in a config must fit in a signed 64-bit integer (seeds, counts, steps)
INT_MAX = 2**63 - 1
#: what a run name may be: one path component under runs/, no leading dot (ASCII form; any
#: Unicode letter, mark or digit is allowed where this allows a letter: see :func:`check_run_name`)
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$"
#: a run name is at most this many bytes in UTF-8 (a directory name, with room for .NAME.partial-PID)
NAME_MAX_BYTES = 200


def check_run_name(name: str) -> str:
    """A run name is one path component: letters, marks and digits of any script, ``_``, and
    ``.``, ``+``, ``-`` after the first character (so no ``/``, no leading dot, no ``..``), at
    most :data:`NAME_MAX_BYTES` bytes in UTF-8."""
    import unicodedata

    def word(c: str) -> bool:
        return c == "_" or unicodedata.category(c)[0] in "LN" or (unicodedata.category(c)[0] == "M")

    if not name:
        raise ValueError("a run name cannot be empty")
    if not (word(name[0]) and unicodedata.category(name[0])[0] != "M"):
        raise ValueError(f"a run name starts with a letter, digit or '_' (got {name[0]!r}): it is a folder name, "
                         "and no leading '.' or '-'")
    bad = [c for c in name if not (word(c) or c in ".+-")]
    if bad:
        raise ValueError(f"a run name is one folder name of letters, digits, '_', '.', '+', '-' (any script); "
                         f"{bad[0]!r} is not allowed")
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        raise ValueError(f"a run name is at most {NAME_MAX_BYTES} bytes in UTF-8, got {len(name.encode('utf-8'))}")
    return name


def _choices(table) -> Any:
    """``Literal`` of a component table's keys: the schema's allowed values come from the table."""
    return Literal[tuple(table)]


def _options_of(cls) -> dict[str, inspect.Parameter]:
    """The options a component's constructor takes (its config section's keys besides ``kind``)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n not in ("self", "layout") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
