"""Human-readable text for `status`, `migrate` and `drain` results (dicts from cluster.client),
shared by the CLI and the demo. Numbers may arrive as JSON strings (int64 fields)."""

from __future__ import annotations


def format_status_table(status: dict) -> str:
    rows = [("INSTANCE", "ROLE", "TP", "PIDS", "STATE", "KV USED", "FREE/TOTAL BLOCKS", "RUNNING", "WAITING",
             "QUEUED PROMPT", "SERVED", "KV IN/OUT MB", "SPEC ACCEPT")]
    for inst in status.get("instances", []):
        load = inst.get("load", {})
        total, free = int(load.get("num_total_blocks", 0)), int(load.get("num_free_blocks", 0))
        pids = ",".join(str(int(p)) for p in inst.get("rank_pids") or [inst.get("pid", 0)])
        rows.append((inst["instance_id"], inst["role"], str(int(inst.get("tensor_parallel_size", 0)) or 1), pids,
                     inst["state"], f"{100 * load.get('kv_usage', 0):.1f}%",
                     f"{free}/{total}", str(load.get("num_running", 0)), str(load.get("num_waiting", 0)),
                     str(load.get("queued_prompt_tokens", 0)), str(inst.get("requests_served", 0)),
                     _kv_cell(inst.get("kv_transfer")), _spec_cell(inst.get("spec_decode"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append(f"model: {status.get('model')}  in flight: {status.get('requests_in_flight', 0)}  "
                 f"total: {status.get('requests_total', 0)}  uptime: {float(status.get('uptime_s', 0)):.0f}s")
    lines.extend(format_spec_lines(status))
    lines.extend(format_prefix_lines(status))
    if "migrations" in status:  # servers before live migration leave it out
        lines.extend(format_migration_lines(status["migrations"]))
    lines.extend(format_frontend_lines(status))
    return "\n".join(lines)


def format_frontend_lines(status: dict) -> list[str]:
    """The deployment, its global scheduler and every front end (servers before the
    front-end / scheduler split leave them out)."""
    lines = []
    sched = status.get("scheduler")
    if sched:
        state = sched.get("state") or "serving"
        lines.append(f"deployment {status.get('deployment', '?')}: scheduler {state}, up "
                     f"{float(sched.get('uptime_s', 0)):.0f}s, {int(sched.get('restarts', 0))} restart(s)")
    frontends = status.get("frontends") or []
    if frontends:
        rows = [("FRONT END", "ADDRESS", "PID", "STATE", "IN FLIGHT", "TOTAL", "UPTIME")]
        for f in frontends:
            me = " *" if f.get("frontend_id") == status.get("frontend_id") else ""
            rows.append((f["frontend_id"] + me, f.get("address", ""), str(f.get("pid", 0)), f.get("state", ""),
                         str(f.get("requests_in_flight", 0)), str(f.get("requests_total", 0)),
                         f"{float(f.get('uptime_s', 0)):.0f}s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return lines


def format_prefix_lines(status: dict) -> list[str]:
    """Prefix reuse: each caching instance's hit rate, then the scheduler's routing decisions."""
    lines = []
    for inst in status.get("instances", []):
        cache = inst.get("prefix_cache")
        if not cache or not int(cache.get("query_tokens", 0)):
            continue
        lines.append(f"prefix cache {inst['instance_id']}: {100 * float(cache.get('hit_rate', 0)):.1f}% of "
                     f"{int(cache['query_tokens'])} prompt tokens served from the device cache, "
                     f"{int(cache.get('cached_blocks', 0))} blocks cached")
    routing = status.get("routing") or {}
    decisions = routing.get("decisions") or {}
    if decisions:
        counts = ", ".join(f"{k} {int(v)}" for k, v in sorted(decisions.items()))
        lines.append(f"routing ({routing.get('policy') or '?'}): {counts}; "
                     f"{int(routing.get('sessions', 0))} session(s)")
    return lines


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


def format_spec_lines(status: dict) -> list[str]:
    """One line per speculating instance: SmartSpec's budget choices, calibration, step-time model."""
    lines = []
    for inst in status.get("instances", []):
        spec = inst.get("spec_decode")
        steps = int((spec or {}).get("steps", 0))
        if not steps:
            continue
        no_spec = int(spec.get("steps_without_speculation", 0))
        line = (f"speculation {inst['instance_id']}: budget {spec.get('budget_mode') or 'fixed'}, "
                f"{100 * no_spec / steps:.0f}% of steps without speculation, "
                f"mean budget {int(spec.get('budget_sum', 0)) / steps:.1f} drafts/step, "
                f"draft skipped {int(spec.get('draft_skipped_steps', 0))} steps, "
                f"{int(spec.get('explorations', 0))} explorations")
        if int(spec.get("calibration_observations", 0)):
            line += (f"; acceptance Brier raw {float(spec.get('calibration_brier_raw', 0)):.3f} -> calibrated "
                     f"{float(spec.get('calibration_brier_calibrated', 0)):.3f}")
        if int(spec.get("step_time_samples", 0)):
            line += (f"; step time predicted {float(spec.get('step_time_predicted_mean_ms', 0)):.2f} ms vs "
                     f"measured {float(spec.get('step_time_measured_mean_ms', 0)):.2f} ms")
        lines.append(line)
    return lines


def _spec_cell(spec: dict | None) -> str:
    if not spec or not int(spec.get("verified", 0)):
        return "-"
    rate = float(spec.get("acceptance_rate", 0))
    per_step = float(spec.get("mean_accepted_per_request_step", 0))
    return f"{100 * rate:.0f}% ({per_step:.2f}/step)"
