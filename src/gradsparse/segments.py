"""Segments: the named parameter tensors a model is made of, and state keyed by them.

A *segment* is one named parameter tensor (``"fc1.weight"``); a :class:`Layout` lists a
model's segments in flattening order. Every piece of algorithm state that has the model's size
(error-feedback memory, momentum, the server's downlink memory) is a :class:`SegmentedTensor`:
a mapping ``segment name -> tensor [..., d_l]``. Engines that see the whole model at once (the
simulators) keep it as one contiguous buffer ``[..., d]`` and hand the algorithm the flat view;
an engine that sees a few tensors at a time (a DDP bucket) reads and writes the segments it holds
by name. Checkpoints store the segments by name, so every engine writes the same state.

What ``scope: entire`` means when an engine sees the model in pieces: the compressor acts on the
concatenation of *all* segments in layout order, exactly as in the simulator; such an engine must
hold every segment's accumulated vector before it compresses (a DDP hook waits for the last
bucket). ``scope: layerwise`` acts on each segment alone and needs no waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterator, Mapping, Sequence

import torch

__all__ = ["Layout", "SegmentedTensor"]


@dataclass(frozen=True)
class Layout:
    """Segment names, shapes and sizes, in flattening order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ValueError(f"{len(self.names)} segment names for {len(self.shapes)} shapes")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"segment names must be unique, got {list(self.names)}")

    @staticmethod
    def of(params: Mapping[str, torch.Tensor]) -> "Layout":
        return Layout(tuple(params), tuple(tuple(int(s) for s in p.shape) for p in params.values()))

    @staticmethod
    def flat(d: int, name: str = "x") -> "Layout":
        """One segment of ``d`` entries (a plain vector)."""
        return Layout((name,), ((int(d),),))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(prod(s) for s in self.shapes)

    @property
    def d(self) -> int:
        return sum(self.sizes)

    def bounds(self) -> list[tuple[str, int, int]]:
        """[(name, start, stop)] of every segment in the flat vector."""
        out, off = [], 0
        for name, size in zip(self.names, self.sizes):
            out.append((name, off, off + size))
            off += size
        return out

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat ``[d]`` vector -> dict of views shaped like the parameters."""
        return {n: w[a:b].view(s) for (n, a, b), s in zip(self.bounds(), self.shapes)}

    def flatten(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def describe(self) -> dict:
        return {"names": list(self.names), "sizes": list(self.sizes)}


class SegmentedTensor(Mapping[str, torch.Tensor]):
    """A mapping ``segment -> tensor [*lead, d_l]`` backed by one buffer ``flat [*lead, d]``.

    ``st["fc1.weight"]`` is a view into ``st.flat``; writing either changes both.
    """

    def __init__(self, layout: Layout, flat: torch.Tensor) -> None:
        if flat.shape[-1] != layout.d:
            raise ValueError(f"buffer of last size {flat.shape[-1]} for a layout of d = {layout.d}")
        self.layout, self.flat = layout, flat

    @staticmethod
    def zeros(layout: Layout, *lead: int, dtype=torch.float32, device=None) -> "SegmentedTensor":
        return SegmentedTensor(layout, torch.zeros(*lead, layout.d, dtype=dtype, device=device))

    @staticmethod
    def from_segments(layout: Layout, segments: Mapping[str, torch.Tensor], what: str = "state") -> "SegmentedTensor":
        missing = [n for n in layout.names if n not in segments]
        extra = [n for n in segments if n not in layout.names]
        if missing or extra:
            raise ValueError(f"{what}: segments do not match the model (missing {missing}, unexpected {extra})")
        parts = []
        for name, size in zip(layout.names, layout.sizes):
            t = segments[name]
            if t.shape[-1] != size:
                raise ValueError(f"{what}: segment {name!r} has {t.shape[-1]} entries, the model has {size}")
            parts.append(t)
        leads = {tuple(p.shape[:-1]) for p in parts}
        if len(leads) != 1:
            raise ValueError(f"{what}: segments disagree on their leading shape {sorted(leads)}")
        return SegmentedTensor(layout, torch.cat(parts, dim=-1))

    def __getitem__(self, name: str) -> torch.Tensor:
        for n, a, b in self.layout.bounds():
            if n == name:
                return self.flat[..., a:b]
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.names)

    def to_segments(self) -> dict[str, torch.Tensor]:
        """Plain dict of cloned segment tensors (what checkpoints hold)."""
        return {n: self.flat[..., a:b].clone() for n, a, b in self.layout.bounds()}

    def clone(self) -> "SegmentedTensor":
        return SegmentedTensor(self.layout, self.flat.clone())

    def rows(self, index: slice | Sequence[int]) -> "SegmentedTensor":
        """The state of some workers (rows of the leading dimension), as a view for slices."""
        return SegmentedTensor(self.layout, self.flat[index])

    def __repr__(self) -> str:
        return f"SegmentedTensor({len(self)} segments, shape {tuple(self.flat.shape)})"
