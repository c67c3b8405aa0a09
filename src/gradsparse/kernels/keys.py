"""Magnitude keys: the tie rule as an integer order (pure-torch path).

Viewing a float's bits as a signed integer of the same width and clearing the sign bit gives a
non-negative key that orders entries exactly like ``|x|`` (``+0.0`` and ``-0.0`` tie, and so do
``+inf`` and ``-inf``); clamping every NaN pattern to one key just above +inf's makes every NaN
rank above +inf and tie with every other NaN. Ranking keys with ties to the lower position is
the package's tie rule.
"""

from __future__ import annotations

import torch

# dtype -> (integer dtype of the same width, mask that clears the sign bit, key of every NaN)
KEY_INFO: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800001),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000001),
    torch.float16: (torch.int16, 0x7FFF, 0x7C01),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F81),
}


def magnitude_keys(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Integer keys ordered like |x| (sign bit cleared, every NaN mapped to one key above +inf)."""
    it, mask, nankey = KEY_INFO[x.dtype]
    if out is None:
        k = torch.bitwise_and(x.view(it), mask)
    else:
        k = torch.bitwise_and(x.view(it), mask, out=out)
    return k.clamp_(max=nankey)
