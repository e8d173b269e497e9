"""SessionTable: which instance served each conversation's last turn (session id -> instance
id), bounded by forgetting the least recently used conversation. The global scheduler reads it
as a soft preference (router/prefix_index.py `choose`); losing an entry only costs a cache
miss, never a wrong answer. Pure, no I/O."""

from __future__ import annotations

from collections import OrderedDict


class SessionTable:
    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._where: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def get(self, session_id: str) -> str | None:
        return self._where.get(session_id) if session_id else None

    def put(self, session_id: str, instance_id: str) -> None:
        if not session_id:
            return
        self._where[session_id] = instance_id
        self._where.move_to_end(session_id)
        while len(self._where) > self.max_sessions:
            self._where.popitem(last=False)

    def forget_instance(self, instance_id: str) -> None:
        """The instance lost its cache (died, respawned, removed): its conversations start over."""
        for sid in [s for s, i in self._where.items() if i == instance_id]:
            del self._where[sid]
