"""Which KV heads each tensor-parallel rank holds, and which source rank slices a destination
rank needs when the two sides differ in TP degree (DistServe's per-phase parallelism).

vLLM shards a layer's KV heads across TP ranks: with `total` KV heads and TP degree `tp`, rank r
holds heads [r * total/tp, (r+1) * total/tp) when tp <= total (tp must divide total), and one
head, number r // (tp/total), when tp > total (total must divide tp): heads are then replicated.

A destination rank needs every head it holds; each comes from some source rank holding it. The
plan groups contiguous heads that come from the same source rank, so an equal-TP transfer is one
whole-block copy per rank pair (rank i from rank i) and a TP2 -> TP1 transfer is two half-block
copies. Pure logic: no tensors, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass


class HeadLayoutError(ValueError):
    """A TP degree that cannot shard (or replicate) the model's KV heads."""


def check_tp(total_heads: int, tp: int) -> None:
    if tp < 1 or total_heads < 1:
        raise HeadLayoutError(f"TP degree and KV head count must be >= 1, got tp={tp}, heads={total_heads}")
    if tp <= total_heads and total_heads % tp:
        raise HeadLayoutError(f"{total_heads} KV heads cannot be split evenly over TP degree {tp}")
    if tp > total_heads and tp % total_heads:
        raise HeadLayoutError(f"TP degree {tp} is not a multiple of the model's {total_heads} KV heads "
                              "(needed to replicate them)")


def heads_of_rank(rank: int, tp: int, total_heads: int) -> range:
    """The global KV head indices TP rank `rank` holds, in its local order."""
    check_tp(total_heads, tp)
    if not 0 <= rank < tp:
        raise HeadLayoutError(f"rank {rank} outside TP degree {tp}")
    if tp <= total_heads:
        per = total_heads // tp
        return range(rank * per, (rank + 1) * per)
    head = rank // (tp // total_heads)
    return range(head, head + 1)


@dataclass(frozen=True)
class HeadSlice:
    """Copy local heads [src_start, src_start + count) of source rank `src_rank` into local heads
    [dst_start, dst_start + count) of the destination rank."""

    src_rank: int
    src_start: int
    dst_start: int
    count: int


def plan_rank(dst_rank: int, dst_tp: int, src_tp: int, total_heads: int) -> tuple[HeadSlice, ...]:
    """The slices destination rank `dst_rank` pulls, one per run of heads from one source rank.

    Among source ranks holding a head, the one "aligned" with the destination is preferred
    (rank dst_rank * src_tp // dst_tp, vLLM's NIXL mapping), so equal TP pairs rank i with rank i
    and a replicated head is read from one rank only."""
    wanted = heads_of_rank(dst_rank, dst_tp, total_heads)
    aligned = dst_rank * src_tp // dst_tp
    holders: dict[int, list[int]] = {}
    for r in range(src_tp):
        for g in heads_of_rank(r, src_tp, total_heads):
            holders.setdefault(g, []).append(r)
    slices: list[HeadSlice] = []
    for dst_local, head in enumerate(wanted):
        ranks = holders[head]
        src = aligned if aligned in ranks else ranks[0]
        src_local = heads_of_rank(src, src_tp, total_heads).index(head)
        last = slices[-1] if slices else None
        if (last is not None and last.src_rank == src and last.src_start + last.count == src_local
                and last.dst_start + last.count == dst_local):
            slices[-1] = HeadSlice(src, last.src_start, last.dst_start, last.count + 1)
        else:
            slices.append(HeadSlice(src, src_local, dst_local, 1))
    return tuple(slices)
