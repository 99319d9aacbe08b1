"""Faster forms of a bundle's postprocessing: one exact, one opt-in (issue 15).

- :func:`channel_argmax` replaces every ``AsDiscreted(argmax=True)``, always: PyTorch's CPU
  ``argmax`` over the channel axis of a ``[C, X, Y, Z]`` map is a strided reduction (5 s for
  2 x 512 x 512 x 64, 21.7 s for 300 slices); comparing channel after channel is 0.2 s and gives
  **identical** labels (the first channel wins a tie, as in ``torch.argmax``; a map with NaN goes
  to ``torch.argmax`` itself). Tests compare the two on the real bundles' outputs.
- ``invert_labels`` (a per-pipeline option, off by default, part of the result identity):
  where a bundle resamples its *probabilities* back to the source grid (``Invertd`` with
  ``nearest_interp=false``) and takes the argmax afterwards (spleen, the demo), take the argmax on
  the network grid and resample the *label map* with nearest neighbour instead, the order
  wholeBody's own bundle uses. It changes labels at boundaries (tests measure Dice against the
  bundle's order on the real configs) and drops the source-grid probabilities (so no
  "probability sum" volume), and saves the probability resampling (9 s for 300 slices) and its
  memory (C float32 maps of the source size).
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["ExactArgmaxd", "channel_argmax", "faster_postprocessing"]


def channel_argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=0, keepdim=True)`` (int64), by channel comparisons: same values, fast on CPU."""
    plain = x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
    if plain.shape[0] == 1 or not plain.is_floating_point() or bool(torch.isnan(plain).any()):
        return torch.argmax(plain, dim=0, keepdim=True)
    best = plain[0].clone()
    index = torch.zeros(plain.shape[1:], dtype=torch.int64, device=plain.device)
    for channel in range(1, plain.shape[0]):
        better = plain[channel] > best  # strict: an equal later channel loses, as in torch.argmax
        index.masked_fill_(better, channel)
        torch.where(better, plain[channel], best, out=best)
    return index.unsqueeze(0)


class ExactArgmaxd:
    """``AsDiscreted(keys, argmax=True)`` computed by :func:`channel_argmax`; meta data kept."""

    def __init__(self, keys: Sequence[Hashable], dtype: torch.dtype = torch.float32) -> None:
        self.keys = tuple(keys)
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.data import MetaTensor

        d = dict(data)
        for key in self.keys:
            source = d[key]
            labels = channel_argmax(torch.as_tensor(source)).to(self.dtype)
            if isinstance(source, MetaTensor):
                out = MetaTensor(labels)
                out.copy_meta_from(source)
                labels = out
            d[key] = labels
        return d


def _argmax_keys(step: Any) -> tuple[Hashable, ...] | None:
    """The keys of an ``AsDiscreted`` that only takes the argmax (keepdim), else None."""
    from monai.transforms import AsDiscreted

    if not isinstance(step, AsDiscreted):
        return None
    kwargs = dict(getattr(step.converter, "kwargs", {}) or {})
    if not kwargs.pop("keepdim", True) or set(kwargs) - {"dtype"}:
        return None
    plain = all(step.argmax) and not any(step.to_onehot) and not any(step.threshold)
    if not plain or any(r is not None for r in step.rounding):
        return None
    return tuple(step.keys)


def _argmax_dtype(step: Any) -> torch.dtype:
    dtype = (getattr(step.converter, "kwargs", {}) or {}).get("dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def faster_postprocessing(steps: Sequence[Any], *, invert_labels: bool) -> tuple[list[Any], bool]:
    """The steps with the exact argmax in place; with ``invert_labels``, labels inverted instead of probabilities.

    Returns (steps, whether the label inversion was applied): it applies only to the pattern
    ``Invertd(pred, nearest_interp=False)`` ... ``AsDiscreted(pred, argmax)``, the only order it can change.
    """
    from monai.transforms import Invertd

    out: list[Any] = []
    argmax_keys = [_argmax_keys(step) for step in steps]
    reordered = False
    skip: set[int] = set()
    for number, step in enumerate(steps):
        if number in skip:
            continue
        keys = argmax_keys[number]
        if keys is not None:
            out.append(ExactArgmaxd(keys, _argmax_dtype(step)))
            continue
        if invert_labels and isinstance(step, Invertd) and len(step.keys) == 1 and not step.nearest_interp[0]:
            key = step.keys[0]
            later = next(
                (n for n in range(number + 1, len(steps)) if argmax_keys[n] == (key,)),
                None,
            )
            if later is not None:
                nearest = copy.copy(step)
                nearest.nearest_interp = (True,)
                out += [ExactArgmaxd((key,), _argmax_dtype(steps[later])), nearest]
                skip.add(later)
                reordered = True
                continue
        out.append(step)
    return out, reordered
