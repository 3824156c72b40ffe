"""Stage 5 of a run, accumulate: running sums of the maps, their merge and their checkpoint state.

Each target keeps a :class:`TargetSums` (float64 count and mean per weight draw and the within-draw
sum of squares on the run's device, Chan's update: :class:`erf._stats.ClusteredMoments`); an :class:`Accumulator` holds one per target plus the count of skipped
non-finite samples, applies the ``nonfinite`` policy, merges with another accumulator (ranks of a
distributed run) and converts to and from the checkpoint's arrays. :func:`save_checkpoint` and
:func:`load_checkpoint` write and read the checkpoint file (format unchanged since the first release:
arrays ``n{i}``, ``mean{i}``, ``m2_{i}`` per target and a JSON ``state``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch

from erf import _io
from erf._integrity import check_checkpoint_arrays, check_position, differences
from erf._stats import ClusteredMoments, ClusterStats


class TargetSums:
    """Running sums of one target's maps per weight draw (:class:`erf._stats.ClusteredMoments`: count
    and mean per draw, within-draw sum of squares), from which the mean map, its M2 and the
    clustered standard error (draws as clusters) follow exactly.

    ``update`` receives the draws the maps come from (draw-major: ``len(draws)`` blocks of equal size).
    """

    def __init__(self, moments: ClusteredMoments):
        self.moments = moments

    @classmethod
    def zeros(cls, map_shape: tuple[int, ...], device: torch.device, first_draw: int = 0,
              draws: int = 1) -> "TargetSums":
        return cls(ClusteredMoments.zeros(map_shape, first_draw, draws, device))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the map."""
        return tuple(self.moments.w.shape)

    @property
    def n(self) -> float:
        """Number of maps summed so far (a host float: synchronises with the device)."""
        return self.moments.n.item()

    def update(self, maps: torch.Tensor, draws: Sequence[int], weight: torch.Tensor | None = None,
               window: tuple[slice, ...] | None = None) -> None:
        """Add ``maps`` ``(B, *map)`` of ``draws``; ``weight`` masks samples out; ``window``: cropped maps."""
        if len(draws) == 1:
            self.moments.update(maps, draws[0], weight=weight, window=window)
            return
        per = maps.shape[0] // len(draws)
        for k, d in enumerate(draws):
            w = None if weight is None else weight[k * per:(k + 1) * per]
            self.moments.update(maps[k * per:(k + 1) * per], d, weight=w, window=window)

    def merge(self, other: "TargetSums") -> "TargetSums":
        """A new sum over both (slots of the same draw combine by Chan's formula)."""
        return TargetSums(self.moments.merge(other.moments))

    def flat(self) -> torch.Tensor:
        """The sums as one float64 vector (for collectives); :meth:`from_flat` reverses it."""
        return self.moments.flat()

    def from_flat(self, flat: torch.Tensor) -> tuple["TargetSums", int]:
        """Sums shaped like ``self`` read from the front of ``flat``; and how many values were used."""
        k = self.moments.numel_flat()
        return TargetSums(self.moments.from_flat(flat[:k])), k

    def state_dict(self, i: int) -> dict[str, np.ndarray]:
        """Checkpoint arrays of target ``i``: ``n{i}``, ``mean{i}``, ``m2_{i}`` and the per-draw sums."""
        n, mean, m2 = self.moments.to_numpy()
        out = {f"n{i}": np.array(float(n)), f"mean{i}": mean, f"m2_{i}": m2}
        out.update(self.moments.state(f"draws{i}_"))
        return out

    def load_state_dict(self, arrays: Any, i: int) -> None:
        """Restore target ``i`` from checkpoint arrays (an open ``np.load``).

        Raises:
            ValueError: a checkpoint without per-draw sums (written before they existed).
        """
        if f"draws{i}_n_draw" not in arrays:
            raise ValueError("it was written by an older erf without per-draw sums (needed for the clustered "
                             "standard error); delete it and run again")
        self.moments.load_state(arrays, f"draws{i}_")

    def result(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(n, mean, M2)`` on the host."""
        return self.moments.to_numpy()

    def clusters(self) -> ClusterStats:
        """The per-draw statistics on the host."""
        return self.moments.to_host()


class Accumulator:
    """The running sums of every target of a run, with the count of skipped non-finite samples.

    Args:
        targets: number of targets; map_shape: spatial shape of the input; device: where sums live.
        nonfinite: ``"raise"`` or ``"skip"`` (samples with NaN/Inf maps); window: the crop's window.
    """

    def __init__(self, targets: int, map_shape: tuple[int, ...], device: torch.device, nonfinite: str = "raise",
                 window: tuple[slice, ...] | None = None, first_draw: int = 0, draws: int = 1):
        self.sums = [TargetSums.zeros(tuple(map_shape), device, first_draw, draws) for _ in range(targets)]
        self.skipped = torch.zeros((), dtype=torch.float64, device=device)
        self.nonfinite = nonfinite
        self.window = window

    def like(self, sums: list[TargetSums], skipped: torch.Tensor) -> "Accumulator":
        """An accumulator with this one's policy holding ``sums`` and ``skipped``."""
        out = Accumulator.__new__(Accumulator)
        out.sums, out.skipped, out.nonfinite, out.window = sums, skipped, self.nonfinite, self.window
        return out

    def add(self, maps: Sequence[torch.Tensor], draw: int, lo: int, hi: int) -> None:
        """Add the maps ``(B, *map)`` per target of inputs ``lo .. hi - 1`` of ``draw``.

        Raises:
            ValueError: a non-finite map with ``nonfinite="raise"`` (names the draw and samples).
        """
        window = self.window
        for st, m in zip(self.sums, maps):
            finite = torch.isfinite(m.reshape(m.shape[0], -1)).all(1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                if self.nonfinite == "raise":
                    raise ValueError(
                        f"non-finite gradients or unit values in draw {draw}, inputs {lo}..{hi - 1} (samples "
                        f"{[lo + b for b in bad[:5]]}; in float16/bfloat16 an activation may have overflowed); "
                        "pass nonfinite='skip' to skip and count them, or use dtype=torch.float32 / smaller inputs")
                self.skipped += (~finite).sum()
                st.update(m, (draw,), weight=finite, window=window)
            else:
                st.update(m, (draw,), window=window)

    def add_stacked(self, maps: Sequence[torch.Tensor], draws: Sequence[int], lo: int, hi: int) -> None:
        """Add stacked maps ``(K, B, *map)`` per target of ``draws`` (K of them), inputs ``lo .. hi - 1``."""
        flat = [m.reshape((-1,) + tuple(m.shape[2:])) for m in maps]
        if all(bool(torch.isfinite(f).all()) for f in flat):
            for st, f in zip(self.sums, flat):
                st.update(f, tuple(draws), window=self.window)
            return
        for k, d in enumerate(draws):  # the per-draw path names the draw and samples
            self.add([m[k] for m in maps], d, lo, hi)

    def merge(self, other: "Accumulator") -> "Accumulator":
        """A new accumulator over both (``self`` first)."""
        return self.like([a.merge(b) for a, b in zip(self.sums, other.sums)], self.skipped + other.skipped)

    def flat(self) -> torch.Tensor:
        """``[skipped, sums of target 0, sums of target 1, ...]`` as one float64 vector."""
        return torch.cat([self.skipped.reshape(1).to(torch.float64)] + [s.flat() for s in self.sums])

    def from_flat(self, flat: torch.Tensor) -> "Accumulator":
        """An accumulator shaped like this one read from a vector written by :meth:`flat`."""
        i, sums = 1, []
        for s in self.sums:
            new, used = s.from_flat(flat[i:])
            sums.append(new)
            i += used
        return self.like(sums, flat[0])

    def centre_rel_stderr(self, reduce: str, min_draws: int = 1) -> float:
        """Relative clustered standard error of the first target's mean over its centre region (map >=
        half its max); inf until ``min_draws`` draws have maps (an error from fewer draws than the run
        asks for would be the input-level one, too small when draws differ)."""
        st = self.sums[0].moments
        if int((st.n_draw > 0).sum().item()) < min_draws or st.n.item() < 2:
            return math.inf
        mean, se = st.mean_and_stderr()
        mean = mean.abs() if reduce == "mean" else mean
        region = mean >= 0.5 * mean.max()
        denom = mean[region].mean().item()
        return math.inf if denom <= 0 else se[region].mean().item() / denom

    def state_dict(self) -> dict[str, np.ndarray]:
        """Checkpoint arrays of every target (see :meth:`TargetSums.state_dict`)."""
        arrays: dict[str, np.ndarray] = {}
        for i, st in enumerate(self.sums):
            arrays.update(st.state_dict(i))
        return arrays

    def load_state_dict(self, arrays: Any, skipped: float) -> None:
        """Restore every target from checkpoint arrays, and the skipped count."""
        for i, st in enumerate(self.sums):
            st.load_state_dict(arrays, i)
        self.skipped.fill_(skipped)

    def results(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(n, mean, M2)`` per target on the host."""
        return [st.result() for st in self.sums]

    def clusters(self) -> list[ClusterStats]:
        """Per-draw statistics per target on the host."""
        return [st.clusters() for st in self.sums]


class Fingerprint(NamedTuple):
    """The key tying a checkpoint to its run (:func:`erf._options.fingerprint`) and the config it hashes
    (stored with the checkpoint to name what differs on resume)."""

    key: str
    config: dict


class _Mismatch(Exception):
    """A checkpoint of another configuration (raised as ValueError naming what differs)."""


def save_checkpoint(path: str, acc: Accumulator, position: tuple[int, int], batch_size: int,
                    fingerprint: Fingerprint) -> None:
    """Write the sums and the position ``(draw, input)`` up to which the work is done (atomically)."""
    arrays = acc.state_dict()
    state = {"fingerprint": fingerprint.key, "draw": position[0], "start": position[1], "batch_size": batch_size,
             "skipped": float(acc.skipped.item()), "targets": len(acc.sums), "config": fingerprint.config}
    arrays["state"] = np.array(json.dumps(state))
    _io.atomic_savez(path, arrays)


def load_checkpoint(path: str, acc: Accumulator, fingerprint: Fingerprint, start: tuple[int, int], *,
                    draws: int, n_per_draw: int | None) -> tuple[tuple[int, int], int | None]:
    """Restore ``acc`` from ``path``; ``(position, batch size)`` to continue from.

    ``start`` is ``(first draw, 0)`` of the run, ``draws`` its number of draws, ``n_per_draw`` its inputs
    per draw (positions outside the run are refused). Without a file: ``(start, None)``, ``acc`` untouched.

    Raises:
        ValueError: the file belongs to another configuration (naming what differs), or is not a
            readable checkpoint of this run.
    """
    if not os.path.isfile(path):
        return start, None
    try:
        with np.load(path, allow_pickle=False) as z:
            state = json.loads(str(z["state"]))
            if not isinstance(state, dict):
                raise ValueError("its state is not a JSON object")
            if state.get("fingerprint") != fingerprint.key:
                saved = state.get("config")
                what = differences(saved, fingerprint.config) if isinstance(saved, dict) else []
                raise _Mismatch(f"checkpoint {path!r} belongs to another configuration"
                                + (f" (differs in {', '.join(what)})" if what else "")
                                + "; refusing to mix runs: delete it or use another path")
            where = f"checkpoint {path!r}"
            check_position(state, start[0], draws, n_per_draw, where)
            loaded = []
            for i, st in enumerate(acc.sums):
                mean, m2 = z[f"mean{i}"], z[f"m2_{i}"]
                count = check_checkpoint_arrays(z[f"n{i}"][()], mean, m2, st.shape, where)
                arrays = {f"n{i}": count, f"mean{i}": mean, f"m2_{i}": m2}
                arrays.update({k: z[k] for k in z.files if k.startswith(f"draws{i}_")})  # per-draw sums
                loaded.append(arrays)
            for i, (st, arrays) in enumerate(zip(acc.sums, loaded)):
                st.load_state_dict(arrays, i)
                if abs(st.n - float(arrays[f"n{i}"])) > 0.5:
                    raise ValueError("its per-draw sums do not match its count")
    except _Mismatch as exc:
        raise ValueError(str(exc)) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # BadZipFile, EOFError, KeyError, RecursionError, ...: one message
        raise ValueError(f"checkpoint {path!r} is not a readable erf checkpoint "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    acc.skipped.fill_(state["skipped"])
    return (state["draw"], state["start"]), state["batch_size"]
