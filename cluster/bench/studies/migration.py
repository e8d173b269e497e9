"""Live migration between decode instances (Llumnix's protocol, router/migration.py): two
studies, each a baseline and the new thing in the same run, printed ratios, JSON + PNG.

migration-downtime: the gap a migration leaves in the client's token stream (the router's
MigrationRecord.downtime_s: source's last token -> destination's first token) against the
sequence length, for live migration (pre-copy stages, then a small stop-and-copy tail),
blocking stop-and-copy (stop, copy the whole KV, resume) and recompute-on-destination (stop,
the destination prefills the sequence again). 1 prefill + 2 decode instances, automatic
balancing off: the benchmark calls FrontEnd.migrate itself (the scheduler runs it). Default model: the random-weight
"kv-heavy" preset (8192 positions, 64 KiB of KV per token, cheap compute), so a 4096-token
sequence has 256 MiB of KV to move. Every migrated output is compared token for token with an
unmigrated run of the same greedy request.

migration-skew: a burst of long decodes lands on one decode instance (the other is draining
while the burst is placed, then rejoins: a scale-out right after a burst). Decode KV caches
are sized so the burst's prompts nearly fill that instance and its decodes outgrow it.
Migration off vs on (the router's freeness balancing), and on with a quarter of the burst
high-priority and priority headroom: p50/p99 TPOT, p99 E2E, migrations, vLLM preemptions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import ray
from prometheus_client import REGISTRY

from cluster.bench.plots import pyplot
from cluster.bench.recorder import StreamRecorder
from cluster.bench.records import RequestRecord, summarize
from cluster.bench.report import align_columns, format_cell
from cluster.bench.studies.common import write_results
from cluster.bench.workload import corpus_token_prompts, random_token_ids
from cluster.client import AsyncClient
from cluster.config import EngineConfig, MigrationConfig, PoolConfig, RouterConfig, ServeConfig
from cluster.entrypoints.launcher import start_cluster
from cluster.models.cache import default_models_dir
from cluster.models.demo import demo_target
from cluster.models.random_weights import write_random_model
from cluster.models.tokenizer import load_serving_tokenizer
from router.errors import RequestError

MODES = ("live", "stop_copy", "recompute")
# The downtime's parts as the router times them (MigrationRecord.phases_s), in order.
PHASES = ("stop", "catch_up", "tail", "commit", "first_token")
GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DOWNTIME_GOALS = {"flatness_max": 1.3, "stop_copy_over_live_min": 10.0}
_POOLS = (PoolConfig("prefill", 1, resource="disagg_prefill"),
          PoolConfig("decode", 2, resource="disagg_decode"))


# ---------------------------------------------------------------- pure helpers


def kv_bytes_per_token(hf_config: dict, dtype_bytes: int | None = None) -> int:
    """KV-cache bytes one token takes in a Llama-style model: layers x KV heads x head dim x
    (K and V) x element size (the model's own dtype unless given)."""
    heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    head_dim = (hf_config.get("head_dim")
                or hf_config["hidden_size"] // hf_config["num_attention_heads"])
    if dtype_bytes is None:
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        dtype_bytes = DTYPE_BYTES[dtype]
    return hf_config["num_hidden_layers"] * heads * head_dim * 2 * dtype_bytes


def model_kv_bytes_per_token(model_dir: str, dtype: str = "auto") -> int:
    """KV bytes per token of a model directory served at `dtype` (auto: the saved dtype; note
    that vLLM's CPU backend serves float32 checkpoints as bfloat16 under "auto", so the
    benchmarks pass their dtype explicitly)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return kv_bytes_per_token(config, DTYPE_BYTES.get(dtype))


def cache_gib(num_tokens: int, bytes_per_token: int, block_size: int) -> float:
    """CPU KV cache (GiB) that holds `num_tokens` tokens in whole blocks, plus vLLM's null
    block."""
    blocks = -(-num_tokens // block_size) + 1
    return blocks * block_size * bytes_per_token / GIB


def stream_gaps(times: list[float], counts: list[int], window: tuple[float, float]) -> dict:
    """Client view of one stream around a migration. `times`/`counts`: arrival time and token
    count of each token-carrying message; `window`: (migrate called, migrate returned + slack).
    max_gap_s: the longest gap between consecutive messages that ended inside the window (the
    migration's stall as the client saw it); median_itl_s: the median per-token gap of the rest
    of the stream (the first message, the prefill's token, has no gap)."""
    inside, outside = [], []
    for i in range(1, len(times)):
        gap = times[i] - times[i - 1]
        if window[0] <= times[i] <= window[1]:
            inside.append(gap)
        elif counts[i] > 0:
            outside.extend([gap / counts[i]] * counts[i])
    return {"max_gap_s": max(inside) if inside else None,
            "median_itl_s": statistics.median(outside) if outside else None}


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where two outputs differ (the shorter's length if one is a
    prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def summarize_downtime(trials: list[dict], modes=MODES) -> dict:
    """Per sequence length: the median downtime (ms) of each mode over its committed trials,
    client-observed gaps, ratios to live; overall flatness live(max L)/live(min L), the
    stop-and-copy/live ratio at the longest length, whether the goals are met, and how many
    migrated outputs equal their unmigrated run."""
    lengths = sorted({t["length"] for t in trials})
    rows = []
    for length in lengths:
        row = {"length": length}
        for mode in modes:
            ts = [t for t in trials if t["length"] == length and t["mode"] == mode]
            ok = [t for t in ts if t["state"] == "committed" and t["downtime_ms"] is not None]
            row[f"{mode}_ms"] = _median(t["downtime_ms"] for t in ok)
            row[f"{mode}_client_gap_ms"] = _median(t["client_max_gap_ms"] for t in ok)
            row[f"{mode}_committed"] = len(ok)
            row[f"{mode}_trials"] = len(ts)
            row[f"{mode}_blocks_copied"] = _median(t["blocks_copied"] for t in ok)
            row[f"{mode}_stages"] = _median(t["stages"] for t in ok)
            row[f"{mode}_phases_ms"] = {ph: _median(t.get("phases_ms", {}).get(ph) for t in ok)
                                        for ph in PHASES}
        row["median_itl_ms"] = _median(t["client_median_itl_ms"] for t in trials
                                       if t["length"] == length)
        row["live_over_itl"] = _ratio(row.get("live_ms"), row["median_itl_ms"])
        for mode in modes[1:]:
            row[f"{mode}_over_live"] = _ratio(row.get(f"{mode}_ms"), row.get("live_ms"))
        rows.append(row)
    summary: dict = {"rows": rows}
    if rows:
        first, last = rows[0], rows[-1]
        summary["flatness"] = _ratio(last.get("live_ms"), first.get("live_ms"))
        # The same in decode steps: downtime holds whole engine steps, which grow with L too.
        summary["flatness_in_itl"] = _ratio(last.get("live_over_itl"), first.get("live_over_itl"))
        summary["itl_growth"] = _ratio(last.get("median_itl_ms"), first.get("median_itl_ms"))
        summary["flatness_lengths"] = [first["length"], last["length"]]
        summary["stop_copy_over_live_at_max"] = last.get("stop_copy_over_live")
        summary["recompute_over_live_at_max"] = last.get("recompute_over_live")
        f, s = summary["flatness"], summary["stop_copy_over_live_at_max"]
        summary["goal_flat_met"] = None if f is None else f <= DOWNTIME_GOALS["flatness_max"]
        summary["goal_10x_met"] = (None if s is None
                                   else s >= DOWNTIME_GOALS["stop_copy_over_live_min"])
    summary["equal"] = {mode: _equal_count([t for t in trials if t["mode"] == mode])
                        for mode in modes}
    return summary


def _equal_count(trials: list[dict]) -> dict:
    """How many trials' outputs equal their unmigrated run, of those compared."""
    return {"equal": sum(1 for t in trials if t.get("equal")),
            "compared": sum(1 for t in trials if t.get("equal") is not None)}


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_downtime_table(summary: dict, modes=MODES) -> str:
    head = f"{'L':>5} " + " ".join(f"{m + ' ms':>13}" for m in modes)
    head += "".join(f" {m + '/live':>15}" for m in modes[1:])
    head += " " + " ".join(f"{m[:4] + ' gap ms':>13}" for m in modes)
    head += f" {'ITL ms':>7} {'live/ITL':>8}"
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        line = f"{r['length']:>5} " + " ".join(f"{_cell(r.get(f'{m}_ms')):>13}" for m in modes)
        line += "".join(f" {_cell(r.get(f'{m}_over_live'), 2):>15}" for m in modes[1:])
        line += " " + " ".join(f"{_cell(r.get(f'{m}_client_gap_ms')):>13}" for m in modes)
        line += f" {_cell(r.get('median_itl_ms')):>7} {_cell(r.get('live_over_itl'), 2):>8}"
        lines.append(line)
    if summary.get("rows"):
        lo, hi = summary["flatness_lengths"]
        met = {True: "met", False: "NOT met", None: "n/a"}
        lines.append(f"flatness live({hi})/live({lo}) = {_cell(summary['flatness'], 2)} "
                     f"(goal <= {DOWNTIME_GOALS['flatness_max']}: "
                     f"{met[summary['goal_flat_met']]}); in decode steps (downtime/ITL) "
                     f"{_cell(summary['flatness_in_itl'], 2)}, ITL itself grew "
                     f"{_cell(summary['itl_growth'], 2)}x")
        lines.append(f"stop_copy/live at {hi} = {_cell(summary['stop_copy_over_live_at_max'], 2)} "
                     f"(goal >= {DOWNTIME_GOALS['stop_copy_over_live_min']:g}: "
                     f"{met[summary['goal_10x_met']]}); recompute/live at {hi} = "
                     f"{_cell(summary['recompute_over_live_at_max'], 2)}")
    eq = summary.get("equal", {})
    lines.append("outputs equal to the unmigrated run: " + ", ".join(
        f"{m} {eq[m]['equal']}/{eq[m]['compared']}" for m in modes if m in eq))
    return "\n".join(lines)


def format_phase_table(summary: dict, modes=MODES) -> str:
    """Median downtime parts (ms) per length and mode: the stop call (it waits for the source's
    step in flight), the stream catching up with the source, the tail copy, the commit call,
    and the destination's first token after the commit. Their sum is the downtime less the
    time from the source's last token to the stop call."""
    head = f"{'L':>5} {'mode':>9} " + " ".join(f"{p:>11}" for p in PHASES) + f" {'downtime':>9}"
    lines = [head, "-" * len(head)]
    for r in summary["rows"]:
        for m in modes:
            phases = r.get(f"{m}_phases_ms") or {}
            if not any(v is not None for v in phases.values()):
                continue
            cells = " ".join(f"{_cell(phases.get(p)):>11}" for p in PHASES)
            lines.append(f"{r['length']:>5} {m:>9} {cells} {_cell(r.get(f'{m}_ms')):>9}")
    return "\n".join(lines)


def latency_stats(records: list[RequestRecord]) -> dict:
    """p50/p99 TPOT, p99 E2E (ms) and counts of a set of RequestRecords."""
    done = [r for r in records if r.ok]
    tpot = summarize(r.tpot_s for r in done if r.tpot_s is not None)
    e2e = summarize(r.e2e_s for r in done if r.e2e_s is not None)
    return {"completed": len(done), "failed": len(records) - len(done),
            "p50_tpot_ms": tpot.median, "p99_tpot_ms": tpot.p99, "mean_tpot_ms": tpot.mean,
            "p50_e2e_ms": e2e.median, "p99_e2e_ms": e2e.p99,
            "migrated_requests": sum(1 for r in done if len(r.served_by) > 2)}


SKEW_METRICS = (("p50_tpot_ms", "p50 TPOT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)"),
                ("mean_tpot_ms", "mean TPOT (ms)"), ("p50_e2e_ms", "p50 E2E (ms)"),
                ("p99_e2e_ms", "p99 E2E (ms)"), ("completed", "completed"),
                ("migrations_committed", "migrations committed"),
                ("migrations_aborted", "migrations aborted"),
                ("migrated_requests", "requests migrated"), ("preemptions", "vLLM preemptions"),
                ("decode0_peak_kv_usage", "decode-0 peak KV use"))


def format_skew_table(runs: dict[str, dict], baseline: str = "off") -> str:
    """Metrics of each run side by side; latency cells of the other runs also show the ratio
    baseline / run (> 1: the run is faster than the baseline)."""
    labels = list(runs)
    rows = [["metric", *labels]]
    for key, title in SKEW_METRICS:
        row = [title]
        base = runs[baseline].get(key) if baseline in runs else None
        for label in labels:
            value = runs[label].get(key)
            cell = format_cell(value)
            if label != baseline and key.endswith("_ms") and value and base:
                cell += f" ({baseline}/{label} {base / value:.2f})"
            row.append(cell)
        rows.append(row)
    return align_columns(rows)


# ---------------------------------------------------------------- shared plumbing


def _serve_config(model: str, max_model_len: int, kv_gib: float, block_size: int | None,
                  migration: MigrationConfig, dtype: str, max_num_seqs: int = 64) -> ServeConfig:
    engine = EngineConfig(model=model, max_model_len=max_model_len, block_size=block_size,
                          cpu_kv_cache_gib=kv_gib, max_num_seqs=max_num_seqs, dtype=dtype)
    router = RouterConfig(host="127.0.0.1", port=0, actor_call_timeout_s=120.0)
    return ServeConfig(engine=engine, router=router, migration=migration, pools=_POOLS)


async def _wait_idle(router, timeout_s: float = 60.0) -> None:
    """Until no request is in the router and every decode engine reports an empty queue."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        decode = [i for i in router.instances.values() if i.role == "decode"]
        if (len(router.table) == 0 and all(i.load is not None and i.load.num_running == 0
                                           and i.load.num_waiting == 0 for i in decode)):
            return
        await asyncio.sleep(0.05)


def _actor_preemptions(worker) -> float | None:
    """Runs inside a worker actor (via __ray_call__): vLLM's own preemption counter from the
    process's Prometheus registry; None when vLLM did not register it."""
    total, seen = 0.0, False
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "vllm:num_preemptions_total":
                total += sample.value
                seen = True
    return total if seen else None


async def _preemptions(router) -> dict[str, float | None]:
    out = {}
    for inst in router.instances.values():
        if inst.role != "decode":
            continue
        call = inst.actor.__ray_call__.remote(_actor_preemptions)
        try:
            out[inst.instance_id] = await asyncio.wait_for(call, 30)
        except Exception:  # noqa: BLE001 - not observable: say so rather than guess
            out[inst.instance_id] = None
    return out


# ---------------------------------------------------------------- migration-downtime


def add_downtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the random-weight kv-heavy preset")
    p.add_argument("--lengths", default="256,512,1024,2048,4096", help="prompt lengths (tokens)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repeats", type=int, default=3, help="migrations per (length, mode)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--migrate-after", type=int, default=8,
                   help="tokens streamed before the migration")
    p.add_argument("--block-size", type=int, default=32, help="KV block size (0: vLLM's default)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="per instance (default: room for two of the longest sequences)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES),
                   help="float32 keeps the preset's 64 KiB of KV per token")
    p.add_argument("--quick", action="store_true",
                   help="lengths 256,1024,4096, 2 repeats, 96 tokens")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--name", default="migration-downtime", help="output file stem")


async def _downtime_trial(cluster, client: AsyncClient, prompt, args, request_id: str,
                          mode: str | None) -> dict:
    """One request; migrated once (mode) after `migrate_after` tokens, or not at all (None)."""
    router = cluster.frontend
    s = StreamRecorder(client, prompt, args.output_len, request_id=request_id)
    await s.reach(args.migrate_after, timeout_s=300.0)
    state = router.table.get(request_id)
    while state is not None and state.phase != "decode" and not s.task.done():
        await asyncio.sleep(0.005)
    trial = {"request_id": request_id, "mode": mode, "length": len(prompt)}
    window = None
    if mode is not None:
        t_call = time.perf_counter() - s.t0
        try:
            rec = await router.migrate(request_id, None, trigger="bench", mode=mode)
            d = rec.to_dict()
        except RequestError as exc:
            d = {"state": "refused", "reason": f"{exc.code.name}: {exc.message}",
                 "downtime_s": None, "stages": 0, "blocks_copied": 0, "tokens_moved": 0,
                 "duration_s": None, "source": None, "target": None, "phases_s": {}}
        t_back = time.perf_counter() - s.t0
        window = (t_call, t_back + 0.25)
        trial.update(state=d["state"], reason=d["reason"], source=d["source"],
                     target=d["target"], stages=d["stages"], blocks_copied=d["blocks_copied"],
                     tokens_moved=d["tokens_moved"], downtime_ms=_ms(d["downtime_s"]),
                     migration_s=d["duration_s"], migrate_call_s=t_back - t_call,
                     phases_ms={k: v * 1000 for k, v in d.get("phases_s", {}).items()},
                     tokens_before=len(s.tokens))
    await s.task
    r = s.record
    gaps = stream_gaps(r.chunk_times, r.chunk_tokens, window or (math.inf, math.inf))
    trial.update(status=r.status, output_tokens=len(s.tokens), served_by=r.served_by,
                 client_max_gap_ms=_ms(gaps["max_gap_s"]),
                 client_median_itl_ms=_ms(gaps["median_itl_s"]), tokens=s.tokens)
    return trial


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


async def _downtime_run(args, model: str, lengths: list[int], modes: list[str]) -> dict:
    bpt = model_kv_bytes_per_token(model, args.dtype)
    block = args.block_size or None
    max_len = max(lengths) + args.output_len + 8
    kv_gib = args.kv_cache_gib or round(cache_gib(2 * max_len, bpt, block or 128) * 1.1, 3)
    config = _serve_config(model, max_len, kv_gib, block, MigrationConfig(enabled=False),
                           args.dtype)
    cluster = await start_cluster(config)
    router = cluster.frontend
    decode = [i for i in router.instances.values() if i.role == "decode"]
    info = decode[0].info
    print(f"[migration-downtime] {bpt} KV bytes/token, block {info.block_size}, "
          f"{info.num_total_blocks} blocks ({kv_gib} GiB) per instance",
          file=sys.stderr, flush=True)
    client = AsyncClient(f"127.0.0.1:{cluster.port}", timeout=900)
    exclude = {0, 1, 2, *info.eos_token_ids}
    # One generator per length: a length's prompt is the same whichever lengths run.
    prompts = {L: random_token_ids([L], info.vocab_size, exclude, np.random.default_rng(L))[0]
               for L in lengths}
    trials, references = [], {}
    try:
        # Warm-up (discarded): every mode on a short sequence, then the copying modes at the
        # longest length, so the transport's pooled shared-memory segments exist before the
        # clock runs (a first 256 MiB segment costs hundreds of ms to fault in).
        warm = [(mode, prompts[min(lengths)][:128]) for mode in modes]
        warm += [(mode, prompts[max(lengths)]) for mode in modes if mode != "recompute"]
        for i, (mode, prompt) in enumerate(warm):
            await _downtime_trial(cluster, client, prompt, args, f"warm-{i}", mode)
            await _wait_idle(router)
        for L in lengths:
            ref = await _downtime_trial(cluster, client, prompts[L], args, f"ref-{L}", None)
            references[L] = ref
            await _wait_idle(router)
            print(f"[migration-downtime] L={L}: unmigrated ITL "
                  f"{_cell(ref['client_median_itl_ms'])} ms", file=sys.stderr, flush=True)
        # Interleaved: repeat, length, mode, so drift on a shared machine hits every mode alike.
        for rep in range(args.repeats):
            for L in lengths:
                for mode in modes:
                    t = await _downtime_trial(cluster, client, prompts[L], args,
                                              f"dt-{L}-{mode}-{rep}", mode)
                    t["repeat"] = rep
                    t["equal"] = t["tokens"] == references[L]["tokens"]
                    if not t["equal"]:
                        t["first_difference"] = first_difference(t["tokens"],
                                                                 references[L]["tokens"])
                    trials.append(t)
                    reason = f" ({t['reason']})" if t["reason"] else ""
                    print(f"[migration-downtime] rep {rep} L={L:>5} {mode:>9}: {t['state']}{reason}"
                          f", downtime {_cell(t['downtime_ms'])} ms, client gap "
                          f"{_cell(t['client_max_gap_ms'])} ms, stages {t['stages']}, "
                          f"blocks {t['blocks_copied']}, equal {t['equal']}",
                          file=sys.stderr, flush=True)
                    await _wait_idle(router)
        migration_status = await router.migration_status()
    finally:
        await client.close()
        await cluster.stop()
        ray.shutdown()
    for t in trials + list(references.values()):
        t.pop("tokens", None)
    return {"study": "migration-downtime",
            "config": vars(args) | {"model": model, "lengths": lengths, "modes": modes,
                                    "kv_bytes_per_token": bpt, "block_size": info.block_size,
                                    "num_total_blocks": info.num_total_blocks,
                                    "kv_cache_gib": kv_gib, "max_model_len": max_len},
            "references": {str(L): r for L, r in references.items()},
            "trials": trials, "router_migration_status": migration_status}


def plot_downtime(results: dict, path) -> None:
    plt = pyplot()
    summary, trials = results["summary"], results["trials"]
    modes = results["config"]["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        rows = [r for r in summary["rows"] if r.get(f"{mode}_ms") is not None]
        xs = [r["length"] for r in rows]
        ax.plot(xs, [r[f"{mode}_ms"] for r in rows], "o-", color=colors[i],
                label=f"{mode} (router, median)")
        ax.plot(xs, [r[f"{mode}_client_gap_ms"] for r in rows], "x:", color=colors[i],
                label=f"{mode} (client max gap)")
        pts = [t for t in trials if t["mode"] == mode and t["downtime_ms"] is not None]
        ax.scatter([t["length"] for t in pts], [t["downtime_ms"] for t in pts], color=colors[i],
                   s=8, alpha=0.4)
    itl = [r for r in summary["rows"] if r.get("median_itl_ms") is not None]
    ax.plot([r["length"] for r in itl], [r["median_itl_ms"] for r in itl], "k--", lw=1,
            label="median ITL")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length at migration (prompt tokens)")
    ax.set_ylabel("downtime (ms)")
    ax.set_title("Stream gap caused by one migration")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax = axes[1]
    for mode in modes[1:]:
        rows = [r for r in summary["rows"] if r.get(f"{mode}_over_live") is not None]
        ax.plot([r["length"] for r in rows], [r[f"{mode}_over_live"] for r in rows], "o-",
                label=f"{mode} / live")
    ax.axhline(DOWNTIME_GOALS["stop_copy_over_live_min"], color="red", lw=0.8, ls="--",
               label="goal: 10x")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length at migration (prompt tokens)")
    ax.set_ylabel("downtime ratio")
    ax.set_title(f"vs live (live flatness {_cell(summary.get('flatness'), 2)})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"migration downtime: block {cfg['block_size']}, "
                 f"{cfg['kv_bytes_per_token'] // 1024} KiB KV/token")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def downtime_main(args) -> int:
    if args.quick:
        args.lengths, args.repeats, args.output_len = "256,1024,4096", 2, 96
    lengths = sorted(int(x) for x in args.lengths.split(","))
    modes = [m for m in args.modes.split(",") if m]
    if any(m not in MODES for m in modes) or "live" not in modes:
        raise SystemExit(f"--modes: a comma list of {MODES} that includes live")
    model = args.model
    if model is None:
        model = str(write_random_model(default_models_dir(), "kv-heavy"))
    results = asyncio.run(_downtime_run(args, model, lengths, modes))
    results["summary"] = summarize_downtime(results["trials"], modes)
    path = write_results(args.out, args.name, results)
    plot_downtime(results, path.with_suffix(".png"))
    print(format_downtime_table(results["summary"], modes))
    print()
    print("downtime by phase (median ms):")
    print(format_phase_table(results["summary"], modes))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


# ---------------------------------------------------------------- migration-skew


def add_skew_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="default: the demo target model")
    p.add_argument("--burst", type=int, default=16, help="requests in the burst")
    p.add_argument("--input-len", type=int, default=384)
    p.add_argument("--output-len", type=int, default=384)
    p.add_argument("--fill", type=float, default=0.75,
                   help="decode KV cache sized so the burst's prompts fill this fraction of one "
                        "instance")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="per instance (overrides --fill)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    p.add_argument("--high-priority-fraction", type=float, default=0.25)
    p.add_argument("--headroom-blocks", type=int, default=16,
                   help="priority run: high-priority headroom")
    p.add_argument("--interval-s", type=float, default=0.5, help="balancing round interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default="off,on,priority", help="which of off, on, priority to run")
    p.add_argument("--repeats", type=int, default=3,
                   help="identical bursts per run, each on a fresh cluster, runs interleaved "
                        "(pooled)")
    p.add_argument("--quick", action="store_true",
                   help="one burst of 8 requests of 256 + 256 tokens")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--name", default="migration-skew", help="output file stem")


def high_priority_indices(n: int, fraction: float) -> set[int]:
    """Every k-th request of the burst (spread over it, not bunched at either end)."""
    count = round(n * fraction)
    if count <= 0:
        return set()
    step = n / count
    return {int(i * step + step / 2) for i in range(count)}


async def _skew_burst(router, client: AsyncClient, label: str, rep: int, prompts, priorities,
                      output_len: int) -> dict:
    """One burst: decode-1 drains while every request lands on decode-0, then rejoins."""
    await _wait_idle(router)
    pre_before = await _preemptions(router)
    mig_before = await router.migration_status()
    await router.drain("decode-1")  # empty: returns at once, stays DRAINING
    t0 = time.perf_counter()
    streams = [StreamRecorder(client, p, output_len, request_id=f"{label}-{rep}-{i}",
                              priority=priorities[i], t0=t0)
               for i, p in enumerate(prompts)]
    samples = []

    async def sample(phase: str) -> None:
        committed = (await router.migration_stats()).committed
        row = {"t": time.perf_counter() - t0, "phase": phase, "committed": committed - mig_before["committed"]}
        for inst in router.instances.values():
            load = inst.load
            if inst.role == "decode" and load is not None:
                row[inst.instance_id] = {"used": load.num_total_blocks - load.num_free_blocks,
                                         "total": load.num_total_blocks,
                                         "running": load.num_running, "waiting": load.num_waiting}
        samples.append(row)

    # Placed: every request decodes (or is done) and decode-0 reports them all.
    d0 = router.instances["decode-0"]
    while True:
        live = [s for s in streams if not s.task.done()]
        states = [router.table.get(s.request_id) for s in live]
        if (all(st is not None and st.phase == "decode" for st in states) and d0.load is not None
                and d0.load.num_running + d0.load.num_waiting >= len(live)):
            break
        await sample("placing")
        await asyncio.sleep(0.02)
    placed_s = time.perf_counter() - t0
    await sample("placed")
    await router.undrain("decode-1")
    while not all(s.task.done() for s in streams):
        await sample("running")
        await asyncio.sleep(0.1)
    duration = time.perf_counter() - t0
    pre_after = await _preemptions(router)
    mig = await router.migration_status()
    records = [s.record for s in streams]
    for i, r in enumerate(records):
        r.index = i
    preemptions = None
    if all(pre_after.get(k) is not None and pre_before.get(k) is not None for k in pre_after):
        preemptions = int(sum(pre_after[k] - pre_before[k] for k in pre_after))
    usage = [row["decode-0"]["used"] / row["decode-0"]["total"] for row in samples
             if "decode-0" in row]
    at_placement = next((row["decode-0"]["used"] / row["decode-0"]["total"] for row in samples
                         if row["phase"] == "placed" and "decode-0" in row), None)
    aborted = {k: v - mig_before["aborted_by_reason"].get(k, 0)
               for k, v in mig["aborted_by_reason"].items()}
    return {"repeat": rep, "records": records, "samples": samples, "duration_s": duration,
            "placed_s": placed_s,
            "migrations_committed": mig["committed"] - mig_before["committed"],
            "migrations_aborted": mig["aborted"] - mig_before["aborted"],
            "aborted_by_reason": {k: v for k, v in aborted.items() if v},
            "preemptions": preemptions, "decode0_peak_kv_usage": max(usage, default=None),
            "decode0_kv_usage_at_placement": at_placement}


def _slim(request: dict) -> dict:
    return {k: v for k, v in request.items() if k not in ("chunk_times", "chunk_tokens")}


def _sum(values):
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


async def _skew_once(label: str, rep: int, model: str, args, migration: MigrationConfig,
                     prompts, priorities, kv_gib: float) -> dict:
    """A fresh cluster, a short warm-up, one burst."""
    config = _serve_config(model, args.input_len + args.output_len + 16, kv_gib,
                           args.block_size, migration, args.dtype)
    cluster = await start_cluster(config)
    router = cluster.frontend
    client = AsyncClient(f"127.0.0.1:{cluster.port}", timeout=1800)
    try:
        warm = [StreamRecorder(client, prompts[i][:64], 16, request_id=f"warm-{label}-{i}")
                for i in range(4)]
        await asyncio.gather(*(w.task for w in warm))
        b = await _skew_burst(router, client, label, rep, prompts, priorities, args.output_len)
        status = await router.migration_status()
        b["migration_downtimes_ms"] = [d * 1000 for d in (await router.migration_stats()).downtimes_s]
        b["migration_downtime_max_ms"] = status["downtime_max_s"] * 1000
    finally:
        await client.close()
        await cluster.stop()
        ray.shutdown()
    s = latency_stats(b["records"])
    why = f": {b['aborted_by_reason']}" if b["aborted_by_reason"] else ""
    print(f"[migration-skew] {label} burst {rep}: p99 TPOT {_cell(s['p99_tpot_ms'])} ms, p99 E2E "
          f"{_cell(s['p99_e2e_ms'], 0)} ms, {b['migrations_committed']} migrations "
          f"({b['migrations_aborted']} aborted{why}), preemptions {b['preemptions']}, decode-0 KV "
          f"at placement {_cell(b['decode0_kv_usage_at_placement'], 2)}, "
          f"peak {_cell(b['decode0_peak_kv_usage'], 2)}", file=sys.stderr, flush=True)
    return b


_SAVED_MIGRATION_KNOBS = ("enabled", "interval_s", "high_priority_headroom_blocks",
                          "migrate_out_threshold", "migrate_in_threshold")


def aggregate_skew(label: str, bursts: list[dict], priorities, migration: MigrationConfig,
                   high_indices: set[int] = frozenset()) -> dict:
    """One run's bursts pooled: percentiles over every request, counts summed. `high_indices`:
    the burst positions that are high-priority in the priority run (their latencies in this
    run too, for comparison). Saved requests keep their latencies, not every token's time."""
    records = [r for b in bursts for r in b["records"]]
    high = [r for r in records if priorities[r.index] > 0]
    normal = [r for r in records if priorities[r.index] <= 0]
    aborted: dict[str, int] = {}
    for b in bursts:
        for k, v in b["aborted_by_reason"].items():
            aborted[k] = aborted.get(k, 0) + v
    downtimes = [d for b in bursts for d in b.get("migration_downtimes_ms", [])]
    out = {"label": label, **latency_stats(records),
           "migrations_committed": sum(b["migrations_committed"] for b in bursts),
           "migrations_aborted": sum(b["migrations_aborted"] for b in bursts),
           "aborted_by_reason": aborted,
           "preemptions": _sum(b["preemptions"] for b in bursts),
           "decode0_peak_kv_usage": max((b["decode0_peak_kv_usage"] or 0.0) for b in bursts),
           "decode0_kv_usage_at_placement": _median(b["decode0_kv_usage_at_placement"]
                                                    for b in bursts),
           "migration_downtime_p50_ms": _median(downtimes),
           "migration_downtime_max_ms": max(downtimes, default=None),
           "migration_config": {k: getattr(migration, k) for k in _SAVED_MIGRATION_KNOBS},
           "bursts": [{k: v for k, v in b.items() if k != "records"} | latency_stats(b["records"])
                      for b in bursts],
           "requests": [_slim(r.to_dict()) | {"priority": priorities[r.index],
                                              "repeat": b["repeat"]}
                        for b in bursts for r in b["records"]]}
    if high_indices:
        out["high_priority_positions"] = latency_stats([r for r in records
                                                        if r.index in high_indices])
    if high:
        out["high_priority"] = latency_stats(high)
        out["normal_priority"] = latency_stats(normal)
    return out


def format_priority_table(results: dict) -> str:
    pr = results["runs"].get("priority")
    if not pr or "high_priority" not in pr:
        return ""
    hi, lo = pr["high_priority"], pr["normal_priority"]
    on = results["runs"].get("on")
    same_in_on = on.get("high_priority_positions") if on else None
    results["priority_comparison"] = {"high": hi, "normal": lo,
                                      "same_requests_in_on_run": same_in_on}
    lines = [f"{'priority run':<28}{'p50 TPOT':>10}{'p99 TPOT':>10}{'p99 E2E':>10}{'migrated':>9}"]
    for name, s in (("high priority (1)", hi), ("normal priority (0)", lo),
                    ("same requests, 'on' run", same_in_on)):
        if s:
            lines.append(f"{name:<28}{_cell(s['p50_tpot_ms']):>10}{_cell(s['p99_tpot_ms']):>10}"
                         f"{_cell(s['p99_e2e_ms'], 0):>10}{s['migrated_requests']:>9}")
    ratio = _ratio(lo["p99_tpot_ms"], hi["p99_tpot_ms"])
    lines.append(f"p99 TPOT normal/high = {_cell(ratio, 2)}; p99 E2E normal/high = "
                 f"{_cell(_ratio(lo['p99_e2e_ms'], hi['p99_e2e_ms']), 2)}")
    return "\n".join(lines)


def plot_skew(results: dict, path) -> None:
    plt = pyplot()
    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = dict(zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    ax = axes[0]
    for label, run in runs.items():
        first = run["bursts"][0]
        for inst, style in (("decode-0", "-"), ("decode-1", ":")):
            pts = [(s["t"], s[inst]["used"] / s[inst]["total"]) for s in first["samples"]
                   if inst in s]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=colors[label],
                        label=f"{label} {inst}")
        ax.axvline(first["placed_s"], color=colors[label], lw=0.6, alpha=0.5)
    ax.set_xlabel("s since the burst (first burst)")
    ax.set_ylabel("KV blocks in use (fraction)")
    ax.set_title("decode KV use (vertical: decode-1 rejoins)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[1], "tpot_ms", "TPOT CDF"), (axes[2], "e2e_ms", "E2E CDF")):
        for label, run in runs.items():
            v = np.sort([r[key] for r in run["requests"] if r.get(key) is not None])
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", color=colors[label],
                        label=label)
            if label == "priority":
                hv = np.sort([r[key] for r in run["requests"]
                              if r.get(key) is not None and r["priority"] > 0])
                if hv.size:
                    ax.step(hv, np.arange(1, hv.size + 1) / hv.size, where="post",
                            color=colors[label], ls="--", label="priority: high only")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"skewed burst: {cfg['burst']} x ({cfg['input_len']} + {cfg['output_len']}) "
                 f"tokens on one of two decode instances, KV {cfg['kv_cache_gib']} GiB each, "
                 f"{cfg['repeats']} burst(s) per run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def skew_main(args) -> int:
    if args.quick:
        args.burst, args.input_len, args.output_len, args.repeats = 8, 256, 256, 1
    if args.model is None:
        args.model = demo_target()
    model = args.model
    bpt = model_kv_bytes_per_token(model, args.dtype)
    prompt_tokens = args.burst * (args.input_len + 1 + args.block_size)  # whole blocks, first token
    kv_gib = args.kv_cache_gib or round(cache_gib(int(prompt_tokens / args.fill), bpt,
                                                  args.block_size), 4)
    prompts = corpus_token_prompts(load_serving_tokenizer(model), args.burst, args.input_len,
                                   seed=args.seed)
    high = high_priority_indices(args.burst, args.high_priority_fraction)
    base = MigrationConfig(enabled=True, interval_s=args.interval_s)
    setups = {
        "off": (MigrationConfig(enabled=False), [0] * args.burst),
        "on": (base, [0] * args.burst),
        "priority": (MigrationConfig(enabled=True, interval_s=args.interval_s,
                                     high_priority_headroom_blocks=args.headroom_blocks),
                     [1 if i in high else 0 for i in range(args.burst)]),
    }
    wanted = [r for r in args.runs.split(",") if r]
    # Interleaved, a fresh cluster per burst: load drift on a shared machine hits every run alike.
    bursts: dict[str, list[dict]] = {label: [] for label in wanted}
    for rep in range(args.repeats):
        for label in wanted:
            migration, priorities = setups[label]
            bursts[label].append(asyncio.run(_skew_once(label, rep, model, args, migration,
                                                        prompts, priorities, kv_gib)))
    runs = {label: aggregate_skew(label, bursts[label], setups[label][1], setups[label][0], high)
            for label in wanted}
    results = {"study": "migration-skew",
               "config": vars(args) | {"kv_bytes_per_token": bpt, "kv_cache_gib": kv_gib,
                                       "high_priority_indices": sorted(high)},
               "runs": runs}
    priority_text = format_priority_table(results)
    path = write_results(args.out, args.name, results)
    plot_skew(results, path.with_suffix(".png"))
    print(format_skew_table(runs, baseline="off" if "off" in runs else wanted[0]))
    if priority_text:
        print()
        print(priority_text)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


DOWNTIME = SimpleNamespace(add_args=add_downtime_args, main=downtime_main)
SKEW = SimpleNamespace(add_args=add_skew_args, main=skew_main)
