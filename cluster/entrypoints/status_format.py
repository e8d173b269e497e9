"""Human-readable text for `status`, `migrate` and `drain` results (dicts from cluster.client),
shared by the CLI and the demo. Numbers may arrive as JSON strings (int64 fields)."""

from __future__ import annotations


def format_status_table(status: dict) -> str:
    rows = [("INSTANCE", "ROLE", "STATE", "KV USED", "FREE/TOTAL BLOCKS", "RUNNING", "WAITING",
             "QUEUED PROMPT", "SERVED", "KV IN/OUT MB", "SPEC ACCEPT")]
    for inst in status.get("instances", []):
        load = inst.get("load", {})
        total, free = int(load.get("num_total_blocks", 0)), int(load.get("num_free_blocks", 0))
        rows.append((inst["instance_id"], inst["role"], inst["state"], f"{100 * load.get('kv_usage', 0):.1f}%",
                     f"{free}/{total}", str(load.get("num_running", 0)), str(load.get("num_waiting", 0)),
                     str(load.get("queued_prompt_tokens", 0)), str(inst.get("requests_served", 0)),
                     _kv_cell(inst.get("kv_transfer")), _spec_cell(inst.get("spec_decode"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"model: {status.get('model')}  in flight: {status.get('requests_in_flight', 0)}  "
                 f"total: {status.get('requests_total', 0)}  uptime: {float(status.get('uptime_s', 0)):.0f}s")
    if "migrations" in status:  # servers before live migration leave it out
        lines.extend(format_migration_lines(status["migrations"]))
    return "\n".join(lines)


def _ms(seconds) -> str:
    return f"{1000 * float(seconds):.1f}"


def format_migration_lines(stats: dict) -> list[str]:
    """One summary line, then one line per migration in flight (numbers may be JSON strings)."""
    aborted = int(stats.get("aborted", 0))
    reasons = stats.get("aborted_by_reason") or {}
    why = f" ({', '.join(f'{k} {int(v)}' for k, v in sorted(reasons.items()))})" if reasons else ""
    downtime = "/".join(_ms(stats.get(f"downtime_{q}_s", 0)) for q in ("p50", "p99", "max"))
    summary = (f"migrations: {int(stats.get('started', 0))} started, "
               f"{int(stats.get('committed', 0))} committed, {aborted} aborted{why}  "
               f"downtime p50/p99/max: {downtime} ms")
    lines = [summary]
    for m in stats.get("in_flight", []):
        lines.append(f"  migrating {m.get('request_id')}: {m.get('source')} -> {m.get('target')} "
                     f"({m.get('state')}, {m.get('trigger')}, stage {int(m.get('stages', 0))}, "
                     f"{int(m.get('blocks_copied', 0))} blocks, {float(m.get('duration_s', 0)):.1f}s)")
    return lines


def format_migration(m: dict) -> str:
    """One line for a finished migration (a Client.migrate() result)."""
    route = f"{m['source']} -> {m['target'] or '?'}"
    if m["state"] != "committed":
        return f"migration of {m['request_id']} {m['state']} ({route}): {m['reason'] or 'no reason given'}"
    downtime = f"downtime {_ms(m['downtime_s'])} ms" if m.get("downtime_s") is not None else "downtime unknown"
    return (f"migrated {m['request_id']}: {route} in {_ms(m['duration_s'])} ms ({downtime}, "
            f"{m['stages']} stage(s), {m['blocks_copied']} blocks, {m['tokens_moved']} tokens)")


def format_drain(d: dict, cancel: bool = False) -> str:
    if cancel:
        return f"{d['instance_id']} undrained: it takes new requests again"
    counts = f"{d['migrated']} migrated, {d['failed']} failed, {d['remaining']} remaining"
    if d["remaining"]:
        return (f"drain of {d['instance_id']} incomplete: {counts} (still draining; "
                f"`disagg-serve drain {d['instance_id']} --cancel` undrains it)")
    return f"drained {d['instance_id']}: {counts}"


def _kv_cell(kv: dict | None) -> str:
    if not kv:
        return "-"
    return f"{int(kv.get('bytes_received', 0)) / 1e6:.1f}/{int(kv.get('bytes_sent', 0)) / 1e6:.1f}"


def _spec_cell(spec: dict | None) -> str:
    if not spec or not int(spec.get("verified", 0)):
        return "-"
    rate = float(spec.get("acceptance_rate", 0))
    per_step = float(spec.get("mean_accepted_per_request_step", 0))
    return f"{100 * rate:.0f}% ({per_step:.2f}/step)"
