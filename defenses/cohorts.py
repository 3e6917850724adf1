"""Cohorts: hierarchical aggregation, secure within each cohort of clients, then combined across cohorts.

Each round :class:`Cohorts` splits the round's clients into cohorts of about ``size`` (a uniformly
random partition drawn from ``uploads.generator``, so it changes every round and is the same for the
same seed), runs one inner aggregation per cohort over the Wire (e.g. secure aggregation: the masks
and Shamir shares stay within the cohort), and combines the cohort aggregates on the server,
weighted by each cohort's included sample count. That is the weighted mean over every included
client, as flat aggregation computes it (tested to 1e-6).

This is the cohort structure of Bonawitz et al. ("Towards federated learning at scale: system
design", MLSys 2019: secure aggregation runs over groups of at least k devices, and the server
combines the groups' sums) and of hierarchical secure aggregation generally: the cost of
secure aggregation grows with the group size (pairwise masks and shares: O(n^2) for Bonawitz et
al., CCS 2017), so groups of ``size`` bring each client's cost to O(size) and the server's to
O(n size) instead of O(n^2).

What the server learns that flat secure aggregation hides: **every cohort's aggregate**, not only
the total. The anonymity set of a client's update is its cohort (at least ``size`` clients), not
the whole round; a cohort's aggregate differenced across rounds in which the cohorts overlap leaks
more (cohorts are redrawn every round, which helps the partition look random but gives the server
many different sums). Pick ``size`` as the smallest group whose sum may be released.

Partition: ``k = max(1, n // size)`` cohorts, sizes as even as possible (``n // k`` or
``n // k + 1``): the clients left over by ``n // size`` full cohorts are merged into the cohorts, one
each, rather than forming a smaller last cohort, so **every cohort has at least ``size`` clients**
(all ``n`` when ``n < size``). Within a cohort the clients keep their arrival order
(``uploads.times``); wrap the inner in :class:`defenses.side_channels.Shuffled` (or Cohorts in it)
to hide that.

A fresh inner aggregation is made (``make_inner()``) for every cohort and round, so no protocol
state (keys, shares, seeds) spans cohorts or rounds; put a stateful wrapper (DP accounting) outside
the cohorts: ``DPAggregation(Cohorts(...), ...)``.

A cohort whose inner round fails (too few survivors, a commitment that does not open): the whole
round raises a ValueError naming the cohort and its clients, and nothing is released (the safe
default: releasing the other cohorts' combination would change the round's population silently
and, for the server, single out the failed cohort).

History columns (``Aggregate.report``): ``cohorts`` (count), ``cohort_min`` and ``cohort_max``
(sizes), ``cohorts_seconds`` (wall-clock of the cohorts' inner rounds, clients' and server's
simulated work together), ``cohorts_combine_seconds`` (the server combining the cohort
aggregates), and the inner reports merged: counts (ints) whose name has a word of :data:`ADDITIVE`
(``bytes``, ``dropped``, ...; e.g. ``secagg_dropped_masked``) and ``*seconds`` summed over the
cohorts (``server_seconds`` then also includes the combination), other values (ring bits, a
clipped fraction, epsilon, a mode) kept when every cohort agrees, else the tuple of the cohorts'
values. Bytes up
and down are the cohorts' sums.

Example:
    >>> from toolkit.federated.wire_aggregation import PlainSum, Uploads
    >>> from toolkit.wire import Wire
    >>> g = torch.Generator().manual_seed(0)
    >>> uploads = Uploads(torch.arange(10.0).reshape(5, 2), tuple(f"c{i}" for i in range(5)),
    ...                   torch.tensor([1.0, 1, 2, 2, 4], dtype=torch.float64), torch.arange(5.0), 1, g)
    >>> result = Cohorts(PlainSum, size=2).over_wire(Wire(), uploads)
    >>> result.update, result.report["cohorts"], result.report["cohort_min"]  # the flat weighted mean
    (tensor([5.4000, 6.4000]), 2, 2)
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from toolkit.federated.wire_aggregation import Aggregate, Uploads, WireAggregator
from toolkit.validate import positive_int
from toolkit.wire import Wire

__all__ = ["Cohorts", "partition", "ADDITIVE"]

# Report columns that add up over cohorts: a number whose name has one of these words (split at "_")
ADDITIVE = frozenset({"bytes", "dropped", "seconds", "rejected", "excluded", "unopened", "clients", "count"})


def partition(n: int, size: int, generator: torch.Generator) -> list[Tensor]:
    """A uniformly random partition of ``range(n)`` into ``max(1, n // size)`` cohorts of sizes
    ``n // k`` or ``n // k + 1`` (each at least ``size``, or all ``n`` when ``n < size``); each
    cohort's indices ascending (arrival order kept). One ``randperm`` from ``generator``.

    Example:
        >>> [c.tolist() for c in partition(5, 2, torch.Generator().manual_seed(0))]
        [[0, 1, 4], [2, 3]]
    """
    n, size = positive_int("the number of clients", n), positive_int("size", size)
    k = max(1, n // size)
    perm = torch.randperm(n, generator=generator)
    return [torch.sort(chunk).values for chunk in torch.tensor_split(perm, k)]


class Cohorts(WireAggregator):
    """Hierarchical aggregation over random cohorts of about ``size`` clients (see the module docstring).

    Args:
        make_inner: makes the aggregation each cohort runs (a class or a factory with no arguments:
            ``SecureAggregation``, ``lambda: SecureAggregation(threshold=0.6)``, ``PlainSum``),
            called afresh for every cohort and round.
        size: the least number of clients in a cohort (>= 2: a cohort of one would release that
            client's update as its aggregate).

    Returns (``over_wire``): the weighted mean over the included clients of every cohort.
    """

    name = "cohorts"

    def __init__(self, make_inner: Callable[[], WireAggregator], *, size: int):
        if isinstance(make_inner, WireAggregator) or not callable(make_inner):
            raise ValueError(f"make_inner must be a callable that makes a WireAggregator (e.g. the class "
                             f"SecureAggregation or a lambda: each cohort and round gets a fresh one), "
                             f"got {make_inner!r}")
        self.size = positive_int("size", size)
        if self.size < 2:
            raise ValueError(f"size must be at least 2, got {size!r}: a cohort of one client releases its "
                             "update as the cohort's aggregate")
        self.make_inner = make_inner
        self._template = self._make()  # checks the factory once; its manifest is the inner's record

    def _make(self) -> WireAggregator:
        inner = self.make_inner()
        if not isinstance(inner, WireAggregator):
            raise ValueError(f"make_inner() must return a WireAggregator (it runs each cohort over the Wire), "
                             f"got {type(inner).__name__}")
        return inner

    def over_wire(self, wire: Wire, uploads: Uploads) -> Aggregate:
        start = time.perf_counter()
        cohorts = partition(len(uploads.names), self.size, uploads.generator)
        results = []
        for j, rows in enumerate(cohorts):
            part = uploads.subset(rows)
            try:
                result = self._make().over_wire(wire, part)
            except ValueError as error:
                raise ValueError(f"round {uploads.round}: cohort {j} of {len(cohorts)} (clients "
                                 f"{list(part.names)}) failed, nothing released: {error}") from error
            results.append(self._checked(result, part, j, uploads.updates.shape[1]))
        inner_seconds = time.perf_counter() - start

        start = time.perf_counter()
        weight = {name: w for name, w in zip(uploads.names, uploads.weights.tolist())}
        totals = torch.tensor([sum(weight[n] for n in r.included) for r in results], dtype=torch.float64)
        used = totals > 0  # a cohort that included nobody adds nothing
        included = tuple(n for r in results for n in r.included)
        if bool(used.any()):
            stacked = torch.stack([r.update.to(torch.float64) for r in results])[used]  # (k', P)
            update = totals[used] @ stacked / totals[used].sum()
        else:
            update = torch.zeros(uploads.updates.shape[1], dtype=torch.float64)
        combine_seconds = time.perf_counter() - start

        report = _merge([r.report for r in results])
        if "server_seconds" in report:
            report["server_seconds"] += combine_seconds
        sizes = [len(rows) for rows in cohorts]
        report.update({"cohorts": len(cohorts), "cohort_min": min(sizes), "cohort_max": max(sizes),
                       "cohorts_seconds": inner_seconds, "cohorts_combine_seconds": combine_seconds})
        return Aggregate(update.to(uploads.updates.dtype), included, sum(r.bytes_up for r in results),
                         sum(r.bytes_down for r in results), report)

    @staticmethod
    def _checked(result: Aggregate, part: Uploads, j: int, p: int) -> Aggregate:
        """The inner's aggregate for cohort ``j`` if it is one: an update of shape (P,), and only
        (distinct) clients of that cohort included."""
        if not isinstance(result, Aggregate):
            raise ValueError(f"cohort {j}: the inner aggregation returned {type(result).__name__}, not an Aggregate")
        strangers = sorted(set(result.included) - set(part.names))
        if strangers or len(set(result.included)) != len(result.included):
            raise ValueError(f"cohort {j}: the inner aggregation included {list(result.included)}, which are not "
                             f"distinct clients of the cohort {list(part.names)}")
        if not isinstance(result.update, Tensor) or result.update.shape != (p,):
            shape = tuple(result.update.shape) if isinstance(result.update, Tensor) else type(result.update).__name__
            raise ValueError(f"cohort {j}: the inner aggregation returned an update of shape {shape}, expected ({p},)")
        return result

    def manifest(self) -> dict[str, Any]:
        return {"protocol": self.name, "version": 1, "size": self.size,
                "partition": "uniform per round, from the protocol generator; every cohort >= size",
                "on_cohort_failure": "raise, nothing released", "inner": self._template.manifest()}

    def __repr__(self) -> str:
        return f"Cohorts({self._template!r}, size={self.size})"


def _merge(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The cohorts' report columns as one row: ints named with a word of :data:`ADDITIVE` and
    ``*seconds`` summed, other values kept when every cohort agrees, else the tuple of the cohorts'
    values (a cohort without the key: None)."""
    keys = list(dict.fromkeys(k for r in reports for k in r))
    out: dict[str, Any] = {}
    for key in keys:
        values = [r.get(key) for r in reports]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        words = set(key.split("_"))
        if numbers and ADDITIVE & words and ("seconds" in words or all(isinstance(v, int) for v in values)):
            out[key] = sum(values)
        elif all(v == values[0] for v in values[1:]):
            out[key] = values[0]
        else:
            out[key] = tuple(values)
    return out
