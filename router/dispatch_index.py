"""DispatchIndex: the decode instances' freeness views kept in dispatch order, so that choosing
where a request goes costs O(log n) plus the instances skipped for lack of room, not a pass
over every instance (the global scheduler decides for every front end; at a thousand
instances a full pass per request is milliseconds).

It answers exactly what router/freeness.py's `pick_dispatch` answers for the same views (a
unit test compares them on random views): for a normal-priority request the order of
`pick_dispatch`'s key is fixed between updates, so the index keeps the views sorted by it and
returns the first one with room. A high-priority request sees the headroom as free, which
orders instances differently (but just as fixedly): a second order serves those. Pure logic,
no I/O.
"""

from __future__ import annotations

import bisect

from cluster.config import FreenessConfig
from router.freeness import InstanceView, available_blocks, freeness, is_high_priority

# A priority that counts as high (is_high_priority) and one that does not: every priority of
# the same class sees the same freeness, so one order per class is enough.
_NORMAL, _HIGH = 0, 1


def _key(view: InstanceView, config: FreenessConfig, priority: int) -> tuple:
    """pick_dispatch's ordering for a request of `priority`."""
    return (-freeness(view, config, priority), view.num_running, view.num_waiting, view.instance_id)


class DispatchIndex:
    def __init__(self, config: FreenessConfig):
        self.config = config
        self._views: dict[str, InstanceView] = {}
        self._keys: dict[str, tuple[tuple, tuple]] = {}  # (normal, high-priority) key
        self._orders: tuple[list[tuple], list[tuple]] = ([], [])  # sorted keys of the non-draining views

    def __len__(self) -> int:
        return len(self._views)

    def views(self) -> list[InstanceView]:
        return list(self._views.values())

    def update(self, view: InstanceView) -> None:
        """Adds or replaces the view of `view.instance_id`."""
        self.remove(view.instance_id)
        self._views[view.instance_id] = view
        if view.draining:
            return  # never a dispatch destination
        high = self.config.high_priority_threshold
        keys = (_key(view, self.config, high - 1), _key(view, self.config, high))
        self._keys[view.instance_id] = keys
        for order, key in zip(self._orders, keys, strict=True):
            bisect.insort(order, key)

    def remove(self, instance_id: str) -> None:
        self._views.pop(instance_id, None)
        keys = self._keys.pop(instance_id, None)
        if keys is not None:
            for order, key in zip(self._orders, keys, strict=True):
                del order[bisect.bisect_left(order, key)]

    def pick(self, needed_blocks: int, priority: int = 0) -> str | None:
        """`pick_dispatch(views, config, needed_blocks, priority)` over the indexed views."""
        order = self._orders[_HIGH if is_high_priority(priority, self.config) else _NORMAL]
        for key in order:
            view = self._views[key[-1]]
            if available_blocks(view, self.config, priority) >= needed_blocks:
                return view.instance_id
        return None
