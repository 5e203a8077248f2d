"""SCH (Segment Cache best Hit rate): a cache that knows the next m tokens' routing.

Eviction takes the cached expert with the fewest pending uses in tokens i..i+m-1, ties by least recent
use; lookups are batched per token and the first C distinct experts are warm. The simulation itself is
the priority-cache pass of sch_simulator.py, which the companion rates share.
"""

from __future__ import annotations

from ..trace_file import RoutingTrace
from .sch_simulator import HitRate, hit_rate


def sch(trace: RoutingTrace, m: int, capacity: int, layer: int | None = None) -> HitRate:
    """SCH at segment length m and cache size C = capacity, for the model (layer=None) or one layer.

    >>> import numpy as np
    >>> ids = np.array([[[[0]], [[1]], [[0]], [[1]]]], dtype=np.int16)  # one sequence: 0 1 0 1
    >>> t = RoutingTrace(ids, num_experts=2, moe_layers=np.array([0]))
    >>> sch(t, m=2, capacity=1).hits, sch(t, m=2, capacity=2).hit_rate
    ((1,), 1.0)
    """
    return hit_rate(trace, "sch", capacity, m=m, layer=layer)
