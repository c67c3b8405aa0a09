"""Parameter constraints declared once, as data.

A component lists the bounds of its numeric parameters in a class attribute ``CONSTRAINTS``
(name -> :class:`Interval`); its constructor checks them with :func:`check` (one message
template: ``"<component> <name> must be <bounds>, got <value>"``) and the config schema builds
the same parameters' fields from the same table (:func:`config_field`), so the YAML schema and
the Python constructor cannot disagree. The invalid-input tests are generated from the tables
(:meth:`Interval.invalid_examples`). The model is scikit-learn's parameter validation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Interval", "check", "check_all", "config_field"]


@dataclass(frozen=True)
class Interval:
    """A real (or, with ``integer``, whole) number between ``low`` and ``high`` (None: unbounded),
    ends included as ``closed`` says ("both", "left", "right", "neither"); never NaN or infinite.
    With ``optional``, None (``null`` in a config: "not set", the component's own default) is
    admitted too."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"
    integer: bool = False
    optional: bool = False

    def __post_init__(self) -> None:
        if self.closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"closed must be both, left, right or neither, got {self.closed!r}")

    @property
    def low_closed(self) -> bool:
        return self.closed in ("both", "left")

    @property
    def high_closed(self) -> bool:
        return self.closed in ("both", "right")

    def admits(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (value == self.low and not self.low_closed)):
            return False
        if self.high is not None and (value > self.high or (value == self.high and not self.high_closed)):
            return False
        return True

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
            out = f"{kind} in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low is not None:
            out = f"{kind} {'>=' if self.low_closed else '>'} {_number(self.low)}"
        elif self.high is not None:
            out = f"{kind} {'<=' if self.high_closed else '<'} {_number(self.high)}"
        else:
            out = kind
        return out + (" or null" if self.optional else "")

    def field_bounds(self) -> dict[str, Any]:
        """The bounds as pydantic ``Field`` keywords (ge / gt / le / lt, allow_inf_nan)."""
        out: dict[str, Any] = {} if self.integer else {"allow_inf_nan": False}
        if self.low is not None:
            out["ge" if self.low_closed else "gt"] = self.low
        if self.high is not None:
            out["le" if self.high_closed else "lt"] = self.high
        return out

    def invalid_examples(self) -> list[Any]:
        """Values the interval refuses, at and beyond its ends (and NaN / infinity for reals)."""
        out: list[Any] = []
        step = 1 if self.integer else 0.5
        if self.low is not None:
            out.append(self.low - step)
            if not self.low_closed:
                out.append(self.low)
        if self.high is not None:
            out.append(self.high + step)
            if not self.high_closed:
                out.append(self.high)
        if self.integer:
            out.append(0.5 + (self.low or 0))
        else:
            out += [math.inf, math.nan]
        return [v for v in out if not self.admits(v)]


def _number(v: float) -> str:
    """A bound as a reader writes it: whole numbers in full (1000000, not 1e+06), others short."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def check(component: str, name: str, value: Any, constraint: Interval) -> None:
    """Raise ValueError ``"<component> <name> must be <bounds>, got <value>"`` unless admitted."""
    if not constraint.admits(value):
        raise ValueError(f"{component} {name} must be {constraint.describe()}, got {value!r}")


def check_all(component: str, constraints: dict[str, Interval], values: dict[str, Any]) -> None:
    """:func:`check` every parameter of ``values`` that ``constraints`` names."""
    for name, constraint in constraints.items():
        if name in values:
            check(component, name, values[name], constraint)


def config_field(default: Any, constraint: Interval, **kw: Any) -> Any:
    """A pydantic ``Field`` whose bounds are ``constraint``'s (the schema's copy of the table)."""
    from pydantic import Field

    return Field(default, **constraint.field_bounds(), **kw)
