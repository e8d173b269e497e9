"""`disagg-serve bench`: load-test a running server over gRPC, in the style of `vllm bench serve`.

Requests arrive on a Poisson (or gamma, for burstiness) schedule; each one is a streamed Generate
call timed on the client: TTFT, per-token ITL, TPOT and E2E latency, plus throughput and goodput.
The math lives in small pure functions so it can be unit tested without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field

import numpy as np

# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    server: str = "localhost:50051"
    num_prompts: int = 100
    request_rate: float = math.inf
    burstiness: float = 1.0
    dataset: str = "corpus"  # corpus | random
    input_len: int = 256
    input_len_range: float = 0.0
    output_len: int = 128
    output_len_range: float = 0.0
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    max_concurrency: int | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    label: str | None = None
    progress: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        return cls(
            server=args.server, num_prompts=args.num_prompts, request_rate=args.request_rate,
            burstiness=args.burstiness, dataset=args.dataset, input_len=args.input_len,
            input_len_range=args.input_len_range, output_len=args.output_len,
            output_len_range=args.output_len_range, ignore_eos=args.ignore_eos,
            temperature=args.temperature, seed=args.seed, max_concurrency=args.max_concurrency,
            slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms, label=args.label,
            progress=not args.no_progress,
        )

    def validate(self) -> None:
        checks = [
            (self.num_prompts >= 1, "--num-prompts must be >= 1"),
            (self.request_rate > 0, "--request-rate must be > 0 (inf sends everything at once)"),
            (self.burstiness > 0, "--burstiness must be > 0"),
            (self.input_len >= 1 and self.output_len >= 1,
             "--input-len and --output-len must be >= 1"),
            (0 <= self.input_len_range < 1, "--input-len-range must be in [0, 1)"),
            (0 <= self.output_len_range < 1, "--output-len-range must be in [0, 1)"),
            (self.max_concurrency is None or self.max_concurrency >= 1,
             "--max-concurrency must be >= 1"),
            (self.temperature >= 0, "--temperature must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise BenchError(message)

    def display_label(self) -> str:
        return self.label or f"{self.dataset}-rate{_fmt_rate(self.request_rate)}"


class BenchError(Exception):
    """A problem that stops the benchmark before it measures anything (bad flags, no server)."""


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    p = parser
    p.add_argument("--server", default="localhost:50051", metavar="HOST:PORT")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=_positive_float, default=math.inf, metavar="R",
                   help="mean arrivals per second; inf (default) sends every request at once")
    p.add_argument("--burstiness", type=_positive_float, default=1.0, metavar="B",
                   help="gamma shape of inter-arrival gaps: 1 is Poisson, <1 burstier, >1 steadier")
    p.add_argument("--dataset", choices=("corpus", "random"), default="corpus",
                   help="corpus: text cut from the Python stdlib sources; random: random token ids")
    p.add_argument("--input-len", type=int, default=256, help="prompt tokens (corpus: approximate)")
    p.add_argument("--input-len-range", type=float, default=0.0, metavar="FRACTION",
                   help="prompt lengths uniform in input-len * [1 - f, 1 + f]")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--output-len-range", type=float, default=0.0, metavar="FRACTION",
                   help="output lengths uniform in output-len * [1 - f, 1 + f]")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the output length (default on)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds arrivals, lengths and prompts")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="cap on requests in flight (arrivals beyond it wait on the client)")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT objective")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: TPOT objective")
    p.add_argument("--result-json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG with latency CDFs and throughput")
    p.add_argument("--label", default=None, help="name of this run in the JSON and plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- pure math


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s, from the start) of n requests; the first is sent at 0.

    Inter-arrival gaps are gamma(shape=B, scale=1/(R*B)): mean 1/R for every B, and B=1 is the
    exponential gap of a Poisson process. An infinite rate sends everything at once."""
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def sample_lengths(n: int, mean: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """n integer lengths uniform in [mean*(1-r), mean*(1+r)], never below 1."""
    low = max(1, int(math.floor(mean * (1 - range_ratio))))
    high = max(low, int(math.ceil(mean * (1 + range_ratio))))
    return rng.integers(low, high + 1, size=n)


def per_token_itl(times: list[float], counts: list[int]) -> list[float]:
    """Inter-token latencies from the token-carrying messages of one stream.

    A message with n tokens that arrives g seconds after the previous one stands for n tokens
    each g/n apart, so batched deltas weigh per token rather than per message. Extra tokens in
    the first message have no gap to measure and are left out."""
    itl: list[float] = []
    for i in range(1, len(times)):
        n = counts[i]
        if n > 0:
            itl.extend([(times[i] - times[i - 1]) / n] * n)
    return itl


@dataclass
class Summary:
    """Latency distribution in milliseconds (None when there were no samples)."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None

    STATS = ("mean", "median", "p90", "p99")


def summarize(values_s) -> Summary:
    """Mean and percentiles (linear interpolation) of values in seconds, reported in ms."""
    v = np.asarray(list(values_s), dtype=float) * 1000.0
    if v.size == 0:
        return Summary()
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return Summary(int(v.size), float(v.mean()), float(p50), float(p90), float(p99))


def meets_slo(ttft_ms: float | None, tpot_ms: float | None,
              slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """True if a completed request meets every SLO given. A request with one output token has
    no TPOT, so it cannot miss the TPOT objective."""
    if slo_ttft_ms is not None and (ttft_ms is None or ttft_ms > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and tpot_ms is not None and tpot_ms > slo_tpot_ms:
        return False
    return True


def goodput(samples: list[tuple[float | None, float | None]], duration_s: float,
            slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> float:
    """DistServe goodput: completed requests per second that meet every SLO.

    `samples` are (ttft_ms, tpot_ms) of the completed requests. With no SLO this is the plain
    request throughput."""
    if duration_s <= 0:
        return 0.0
    good = sum(meets_slo(t, p, slo_ttft_ms, slo_tpot_ms) for t, p in samples)
    return good / duration_s


# ---------------------------------------------------------------- per-request records


@dataclass
class RequestRecord:
    """One request as the client saw it. Times are seconds from the benchmark start."""

    index: int
    target_input_len: int
    target_output_len: int
    status: str = "PENDING"  # OK, a gRPC status code name, or a client-side failure
    error: str = ""
    scheduled_s: float = 0.0
    send_s: float | None = None
    end_s: float | None = None  # the final message arrived
    done_s: float | None = None  # the call ended, whether it succeeded or failed
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str | None = None
    served_by: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    @property
    def ttft_s(self) -> float | None:
        if self.send_s is None or not self.chunk_times:
            return None
        return self.chunk_times[0] - self.send_s

    @property
    def e2e_s(self) -> float | None:
        if self.send_s is None or self.end_s is None:
            return None
        return self.end_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        return per_token_itl(self.chunk_times, self.chunk_tokens)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("ttft", "tpot", "e2e"):
            value = getattr(self, f"{name}_s")
            d[f"{name}_ms"] = None if value is None else value * 1000.0
        return d


# ---------------------------------------------------------------- results

LATENCIES = ("ttft", "tpot", "itl", "e2e")


@dataclass
class BenchResult:
    label: str
    config: dict
    model: str
    duration_s: float
    completed: int
    failed: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    goodput: float
    ttft: Summary
    tpot: Summary
    itl: Summary
    e2e: Summary
    peak_concurrency: int
    records: list[RequestRecord]
    warnings: list[str] = field(default_factory=list)
    prompt_sizing: str = ""  # how prompt lengths were hit (corpus text has no fixed length)

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict:
        """Flat metrics (vLLM-like keys such as p99_ttft_ms), then config and records."""
        d = {
            "label": self.label, "model": self.model,
            "request_rate": _json_float(self.config.get("request_rate")),
            "duration_s": self.duration_s, "completed": self.completed,
            "num_failed": self.num_failed, "failed": dict(self.failed),
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "goodput": self.goodput, "peak_concurrency": self.peak_concurrency,
        }
        for name in LATENCIES:
            summary: Summary = getattr(self, name)
            for stat in Summary.STATS:
                d[f"{stat}_{name}_ms"] = getattr(summary, stat)
        d["warnings"] = list(self.warnings)
        d["prompt_sizing"] = self.prompt_sizing
        d["config"] = {k: _json_float(v) for k, v in self.config.items()}
        d["requests"] = [r.to_dict() for r in self.records]
        return d


def _json_float(value):
    # JSON has no Infinity; "inf" round-trips through float().
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def in_flight_steps(records: list[RequestRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(event times, requests in flight just after each event) from send and done times."""
    events = []
    for r in records:
        if r.send_s is not None:
            stop = next(t for t in (r.done_s, r.end_s, r.send_s) if t is not None)
            events.append((r.send_s, 1))
            events.append((stop, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    times = np.array([t for t, _ in events], dtype=float)
    return times, np.cumsum([step for _, step in events], dtype=int)


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once."""
    _, counts = in_flight_steps(records)
    return int(counts.max()) if counts.size else 0


def consistency_warnings(records: list[RequestRecord], cfg: BenchConfig) -> list[str]:
    """Things the server did that the benchmark did not ask for (they skew the numbers)."""
    warnings = []
    done = [r for r in records if r.ok]
    miscounted = [r for r in done if sum(r.chunk_tokens) != r.output_tokens]
    if miscounted:
        warnings.append(f"{len(miscounted)} requests streamed a different number of tokens than "
                        f"their usage.completion_tokens reports")
    if done:
        got = sum(r.prompt_tokens for r in done) / len(done)
        want = sum(r.target_input_len for r in done) / len(done)
        if abs(got - want) > 0.1 * want:
            warnings.append(f"prompts averaged {got:.1f} tokens against {want:.1f} targeted")
    if cfg.ignore_eos:
        short = [r for r in done if r.output_tokens != r.target_output_len]
        if short:
            warnings.append(f"{len(short)} requests with ignore_eos returned a token count other "
                            f"than max_tokens (e.g. request {short[0].index}: "
                            f"{short[0].output_tokens} of {short[0].target_output_len})")
    return warnings


def build_result(cfg: BenchConfig, model: str, records: list[RequestRecord],
                 duration_s: float) -> BenchResult:
    done = [r for r in records if r.ok]
    failed: dict[str, int] = {}
    for r in records:
        if not r.ok:
            failed[r.status] = failed.get(r.status, 0) + 1
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    ttft_tpot_ms = [(_ms(r.ttft_s), _ms(r.tpot_s)) for r in done]
    return BenchResult(
        label=cfg.display_label(), config=asdict(cfg), model=model, duration_s=duration_s,
        completed=len(done), failed=dict(sorted(failed.items())),
        total_input_tokens=total_in, total_output_tokens=total_out,
        request_throughput=per_s(len(done)), output_throughput=per_s(total_out),
        total_token_throughput=per_s(total_in + total_out),
        goodput=goodput(ttft_tpot_ms, duration_s, cfg.slo_ttft_ms, cfg.slo_tpot_ms),
        ttft=summarize(r.ttft_s for r in done if r.ttft_s is not None),
        tpot=summarize(r.tpot_s for r in done if r.tpot_s is not None),
        itl=summarize(x for r in done for x in r.itl_s()),
        e2e=summarize(r.e2e_s for r in done if r.e2e_s is not None),
        peak_concurrency=peak_concurrency(records), records=records,
        warnings=consistency_warnings(records, cfg),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


# ---------------------------------------------------------------- datasets


@dataclass
class Prompt:
    prompt: str | list[int]
    input_len: int  # target; the server's usage says what it really was
    output_len: int


_corpus_cache: dict[int, str] = {}


def stdlib_corpus(max_chars: int = 2_000_000) -> str:
    """Python source text of the standard library, files in sorted order, up to max_chars.

    Third-party packages and the test suites (odd encodings, huge data literals) are skipped, so
    the text depends only on the Python version."""
    if max_chars in _corpus_cache:
        return _corpus_cache[max_chars]
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    parts, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                continue
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                _corpus_cache[max_chars] = "\n".join(parts)
                return _corpus_cache[max_chars]
    _corpus_cache[max_chars] = "\n".join(parts)
    return _corpus_cache[max_chars]


def cut_corpus(text: str, num_chars: int, rng: np.random.Generator) -> str:
    """A passage of num_chars characters starting at a random line start."""
    num_chars = min(num_chars, len(text))
    start = int(rng.integers(0, len(text) - num_chars + 1))
    line_start = text.rfind("\n", 0, start) + 1  # back up to whole lines: reads like real code
    return text[line_start:line_start + num_chars]


def corpus_prompts(input_lens, output_lens, chars_per_token: float,
                   rng: np.random.Generator, text: str | None = None) -> list[Prompt]:
    """Passages sized by an average characters-per-token ratio (lengths are approximate)."""
    text = text if text is not None else stdlib_corpus()
    return [Prompt(cut_corpus(text, max(1, round(n * chars_per_token)), rng), int(n), int(m))
            for n, m in zip(input_lens, output_lens)]


def load_local_tokenizer(model: str):
    """The server's tokenizer when its model directory is readable here (same machine or a
    shared disk); None otherwise."""
    path = os.path.join(model, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(path)
    except Exception:  # any problem: fall back to the server-measured ratio
        return None


def cut_corpus_tokens(text: str, num_tokens: int, tokenizer, rng: np.random.Generator) -> str:
    """A passage that tokenizes to num_tokens tokens, special tokens (BOS) included; a token or
    so off where the cut splits a word."""
    specials = len(tokenizer.encode("", add_special_tokens=True).ids)
    want = max(1, num_tokens - specials)
    passage = cut_corpus(text, want * 8 + 64, rng)  # code averages well under 8 chars a token
    enc = tokenizer.encode(passage, add_special_tokens=False)
    if len(enc.ids) <= want:
        return passage
    return passage[:enc.offsets[want - 1][1]]


def corpus_prompts_exact(input_lens, output_lens, tokenizer, rng: np.random.Generator,
                         text: str | None = None) -> list[Prompt]:
    text = text if text is not None else stdlib_corpus()
    return [Prompt(cut_corpus_tokens(text, int(n), tokenizer, rng), int(n), int(m))
            for n, m in zip(input_lens, output_lens)]


def random_prompts(input_lens, output_lens, vocab_size: int, exclude: set[int],
                   rng: np.random.Generator) -> list[Prompt]:
    """Random token ids, avoiding special ids (EOS/BOS) that would change what the model does."""
    allowed = np.setdiff1d(np.arange(vocab_size), np.fromiter(exclude, dtype=np.int64))
    return [Prompt(rng.choice(allowed, size=int(n)).tolist(), int(n), int(m))
            for n, m in zip(input_lens, output_lens)]


# ---------------------------------------------------------------- driving the server


async def _probe(client, prompt, timeout: float = 120.0):
    """One tiny request before the clock starts: proves the server generates, and says how many
    tokens the prompt became."""
    last = None
    async for msg in client.stream(prompt, max_tokens=1, temperature=0.0, timeout=timeout):
        last = msg
    if last is None or not last.finished:
        raise BenchError("the probe request ended without a final message")
    return last


def _check_lengths(cfg: BenchConfig, info) -> None:
    max_prompt = info.max_prompt_tokens or (info.max_model_len - 1)
    in_max = math.ceil(cfg.input_len * (1 + cfg.input_len_range))
    out_max = math.ceil(cfg.output_len * (1 + cfg.output_len_range))
    if in_max > max_prompt:
        raise BenchError(f"prompts up to {in_max} tokens exceed the server's limit of {max_prompt}")
    if in_max + out_max > info.max_model_len:
        raise BenchError(f"prompt ({in_max}) + output ({out_max}) tokens exceed the model's max "
                         f"length of {info.max_model_len}")


async def _build_prompts(cfg: BenchConfig, client, info) -> tuple[list[Prompt], str]:
    """The prompts, and how their lengths were set (for the record). Always sends one probe
    request first, so a broken server fails here rather than N times."""
    rng = np.random.default_rng(cfg.seed)
    input_lens = sample_lengths(cfg.num_prompts, cfg.input_len, cfg.input_len_range, rng)
    output_lens = sample_lengths(cfg.num_prompts, cfg.output_len, cfg.output_len_range, rng)
    if cfg.dataset == "random":
        exclude = set(info.eos_token_ids)
        if info.bos_token_id >= 0:
            exclude.add(info.bos_token_id)
        prompts = random_prompts(input_lens, output_lens, info.vocab_size, exclude, rng)
        await _probe(client, prompts[0].prompt)
        return prompts, "random token ids (exact)"
    text = stdlib_corpus()
    tokenizer = load_local_tokenizer(info.model)
    if tokenizer is not None:
        prompts = corpus_prompts_exact(input_lens, output_lens, tokenizer, rng, text)
        await _probe(client, prompts[0].prompt)
        return prompts, "local copy of the server's tokenizer"
    # No tokenizer here: measure the corpus' characters per token on the server, on passages
    # drawn like the prompts (a separate generator keeps the prompts the same either way).
    max_prompt = info.max_prompt_tokens or (info.max_model_len - 1)
    probe_rng = np.random.default_rng([cfg.seed, 1])
    sample = "\n".join(cut_corpus(text, 400, probe_rng) for _ in range(10))
    sample = sample[:max_prompt]  # a token covers at least one character
    probe = await _probe(client, sample)
    if probe.usage.prompt_tokens <= 0:
        raise BenchError("the server reported 0 prompt tokens for the probe; cannot size prompts")
    chars_per_token = len(sample) / probe.usage.prompt_tokens
    prompts = corpus_prompts(input_lens, output_lens, chars_per_token, rng, text)
    return prompts, f"server-measured ratio, {chars_per_token:.2f} chars/token (approximate)"


async def _run_request(client, prompt: Prompt, cfg: BenchConfig, record: RequestRecord,
                       t0: float, limiter) -> RequestRecord:
    import grpc

    from cluster.client import FINISH_REASONS

    async with limiter:
        record.send_s = time.perf_counter() - t0
        try:
            call = client.stream(prompt.prompt, max_tokens=prompt.output_len,
                                 temperature=cfg.temperature, ignore_eos=cfg.ignore_eos)
            async for msg in call:
                now = time.perf_counter() - t0
                if msg.token_ids:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(len(msg.token_ids))
                if msg.finished:
                    record.end_s = now
                    record.finish_reason = FINISH_REASONS.get(msg.finish_reason)
                    record.prompt_tokens = msg.usage.prompt_tokens
                    record.output_tokens = msg.usage.completion_tokens
                    record.served_by = list(msg.served_by)
            record.status = _final_status(record)
        except grpc.aio.AioRpcError as exc:
            record.status, record.error = exc.code().name, exc.details() or ""
        except Exception as exc:  # a client-side failure still counts against the run
            record.status, record.error = f"CLIENT_{type(exc).__name__}", str(exc)
        finally:
            record.done_s = time.perf_counter() - t0
    return record


def _rpc_error(exc) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _final_status(record: RequestRecord) -> str:
    if record.end_s is None:
        return "INCOMPLETE_STREAM"  # stream closed OK without its final message
    if record.finish_reason == "abort":
        return "FINISH_ABORT"
    return "OK"


async def run_benchmark(cfg: BenchConfig) -> BenchResult:
    import grpc

    from cluster.client import AsyncClient

    cfg.validate()
    client = AsyncClient(cfg.server)
    try:
        try:
            info = await client.model_info()
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"cannot reach {cfg.server}: {_rpc_error(exc)}") from exc
        _check_lengths(cfg, info)
        try:
            prompts, sizing = await _build_prompts(cfg, client, info)
        except grpc.aio.AioRpcError as exc:
            raise BenchError(f"the probe request failed: {_rpc_error(exc)}") from exc
        offsets = arrival_offsets(cfg.num_prompts, cfg.request_rate, cfg.burstiness, cfg.seed)
        records, duration = await _drive(client, cfg, prompts, offsets)
    finally:
        await client.close()
    result = build_result(cfg, info.model, records, duration)
    result.prompt_sizing = sizing
    return result


async def _drive(client, cfg: BenchConfig, prompts: list[Prompt], offsets: np.ndarray):
    """Sends each prompt at its arrival time; returns the records and the wall time taken."""
    from tqdm import tqdm

    limiter = (asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency
               else contextlib.nullcontext())
    records = [RequestRecord(i, p.input_len, p.output_len, scheduled_s=float(o))
               for i, (p, o) in enumerate(zip(prompts, offsets))]
    bar = tqdm(total=len(prompts), file=sys.stderr, disable=not cfg.progress, unit="req",
               desc=cfg.display_label(), dynamic_ncols=True)
    tasks = []
    t0 = time.perf_counter()
    for prompt, record in zip(prompts, records):
        delay = record.scheduled_s - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(_run_request(client, prompt, cfg, record, t0, limiter))
        task.add_done_callback(lambda _t: bar.update(1))
        tasks.append(task)
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    bar.close()
    return records, duration


# ---------------------------------------------------------------- report


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_rate(rate) -> str:
    rate = float(rate)
    return "inf" if math.isinf(rate) else f"{rate:g}"


LATENCY_TITLES = {
    "ttft": "Time to first token",
    "tpot": "Time per output token (after the first)",
    "itl": "Inter-token latency (per token)",
    "e2e": "End-to-end request latency",
}


def format_table(result: BenchResult) -> str:
    width = 56
    cfg = result.config
    rows: list[tuple[str, object] | str] = [
        _banner(" disagg-serve benchmark ", "=", width),
        ("Label", result.label), ("Model", _short_model(result.model)),
        ("Requests completed", result.completed), ("Requests failed", result.num_failed),
    ]
    rows += [(f"  {code}", n) for code, n in result.failed.items()]
    rows += [
        ("Arrival rate (req/s)", _fmt_rate(cfg["request_rate"])),
        ("Burstiness", cfg["burstiness"]),
        ("Max concurrency", cfg["max_concurrency"] or "unlimited"),
        ("Peak requests in flight", result.peak_concurrency),
        ("Duration (s)", result.duration_s),
        ("Prompt tokens, total", result.total_input_tokens),
        ("Output tokens, total", result.total_output_tokens),
        ("Request throughput (req/s)", result.request_throughput),
        ("Output token throughput (tok/s)", result.output_throughput),
        ("Total token throughput (tok/s)", result.total_token_throughput),
        (_goodput_label(cfg), result.goodput),
    ]
    for name in LATENCIES:
        summary: Summary = getattr(result, name)
        rows.append(_banner(f" {LATENCY_TITLES[name]} ", "-", width))
        short = name.upper()
        rows += [(f"{stat.capitalize() if stat != 'median' else 'Median (p50)'} {short} (ms)",
                  getattr(summary, stat)) for stat in Summary.STATS]
    rows.append("=" * width)
    lines = [r if isinstance(r, str) else _row(r[0], _fmt(r[1]), width) for r in rows]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def _short_model(model: str) -> str:
    # Model directories are long absolute paths; the last two parts say which model it is.
    parts = [p for p in model.split(os.sep) if p]
    return os.path.join(*parts[-2:]) if model.startswith(os.sep) and parts else model


def _row(name: str, value: str, width: int) -> str:
    label = f"{name}:"
    return f"{label}{value:>{max(width - len(label), len(value) + 1)}}"


def _goodput_label(cfg: dict) -> str:
    slos = []
    if cfg.get("slo_ttft_ms") is not None:
        slos.append(f"TTFT<={cfg['slo_ttft_ms']:g}ms")
    if cfg.get("slo_tpot_ms") is not None:
        slos.append(f"TPOT<={cfg['slo_tpot_ms']:g}ms")
    return f"Goodput, {' '.join(slos)} (req/s)" if slos else "Goodput, no SLO (req/s)"


def _banner(text: str, fill: str, width: int) -> str:
    return text.center(width, fill)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms, title: str, slo_ms: float | None = None) -> None:
    v = np.sort(np.asarray(values_ms, dtype=float))
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post")
        for q, style in ((50, ":"), (99, "--")):
            x = np.percentile(v, q)
            ax.axvline(x, color="gray", linestyle=style, linewidth=1, label=f"p{q} {x:.1f} ms")
    if slo_ms is not None:
        ax.axvline(slo_ms, color="red", linewidth=1, label=f"SLO {slo_ms:g} ms")
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if v.size or slo_ms is not None:
        ax.legend(fontsize=8, loc="lower right")


def token_rate_series(records: list[RequestRecord], duration_s: float, bins: int = 40,
                      min_width_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(bin centers s, output tokens/s in each bin). Bins are at least min_width_s wide: the
    engine emits tokens in steps, and narrower bins only show that step rhythm."""
    width = max(duration_s / bins, min_width_s)
    # The last bin ends at the run's end, so a partial bin is not diluted by idle time; a sliver
    # shorter than half a bin joins the one before it instead of making a noisy point.
    edges = np.arange(0.0, duration_s, width)
    if edges.size > 1 and duration_s - edges[-1] < width / 2:
        edges[-1] = duration_s
    else:
        edges = np.append(edges, duration_s)
    if edges.size < 2:
        return np.zeros(0), np.zeros(0)
    times = [t for r in records for t in r.chunk_times]
    weights = [n for r in records for n in r.chunk_tokens]
    counts, _ = np.histogram(times, bins=edges, weights=weights)
    widths = np.maximum(np.diff(edges), 1e-9)
    return (edges[:-1] + edges[1:]) / 2, counts / widths


def plot_result(result: BenchResult, path: str) -> None:
    """2x2: TTFT, TPOT and E2E CDFs, and output tokens/s with requests in flight over time."""
    plt = _pyplot()
    done = [r for r in result.records if r.ok]
    cfg = result.config
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    _cdf(axes[0, 0], [r.ttft_s * 1000 for r in done if r.ttft_s is not None],
         "TTFT CDF", cfg.get("slo_ttft_ms"))
    _cdf(axes[0, 1], [r.tpot_s * 1000 for r in done if r.tpot_s is not None],
         "TPOT CDF", cfg.get("slo_tpot_ms"))
    _cdf(axes[1, 0], [r.e2e_s * 1000 for r in done if r.e2e_s is not None], "E2E latency CDF")
    ax = axes[1, 1]
    centers, tok_s = token_rate_series(result.records, result.duration_s)
    ax.plot(centers, tok_s, marker=".", label="output tok/s")
    ax.set_title("Output tokens over time")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens / s")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    times, in_flight = in_flight_steps(result.records)
    twin.step(np.r_[0.0, times], np.r_[0, in_flight], where="post", color="tab:orange",
              alpha=0.7, label="requests in flight")
    twin.set_ylabel("requests in flight")
    twin.set_ylim(bottom=0)
    twin.yaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="best")
    fig.suptitle(f"{result.label}: {result.completed} ok, {result.num_failed} failed, "
                 f"rate {_fmt_rate(cfg['request_rate'])} req/s, "
                 f"{result.output_throughput:.1f} out tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _x_value(result: dict, x_key: str) -> float:
    value = result.get(x_key, result.get("config", {}).get(x_key))
    if value is None:
        raise KeyError(f"no {x_key!r} in a result (top level or config)")
    return float(value)


def sweep_plot(results: list[dict], x_key: str, path: str, title: str) -> None:
    """Latency percentiles and goodput of several result JSONs against one knob (e.g.
    request_rate); results with different labels become separate series."""
    plt = _pyplot()
    series: dict[str, list[dict]] = {}
    for r in results:
        series.setdefault(r.get("label") or "run", []).append(r)
    xs_all = [_x_value(r, x_key) for r in results]
    finite = [x for x in xs_all if math.isfinite(x)]
    inf_at = (max(finite) * 1.25 if finite else 1.0)  # inf gets its own tick past the rest

    def place(x: float) -> float:
        return x if math.isfinite(x) else inf_at

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(series.items()):
        runs = sorted(runs, key=lambda r: _x_value(r, x_key))
        xs = [place(_x_value(r, x_key)) for r in runs]
        color = colors[i % len(colors)]
        for ax, metric in ((axes[0], "ttft"), (axes[1], "tpot")):
            for stat, style, marker in (("median", "-", "o"), ("p90", "--", "s"),
                                        ("p99", ":", "^")):
                ys = [_nan(r.get(f"{stat}_{metric}_ms")) for r in runs]
                ax.plot(xs, ys, style, marker=marker, color=color, label=f"{label} {stat}")
        axes[2].plot(xs, [_nan(r.get("goodput")) for r in runs], "-", marker="o", color=color,
                     label=f"{label} goodput")
        axes[2].plot(xs, [_nan(r.get("request_throughput")) for r in runs], ":", marker="x",
                     color=color, label=f"{label} throughput")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)", "requests / s")):
        ax.set_xlabel(x_key)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if len(finite) < len(xs_all):
            ticks = sorted(set(finite)) + [inf_at]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks[:-1]] + ["inf"])
    axes[0].set_title("TTFT")
    axes[1].set_title("TPOT")
    axes[2].set_title("Goodput and throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _nan(value) -> float:
    return float("nan") if value is None else float(value)


COMPARE_METRICS = (
    ("completed", "Completed"), ("num_failed", "Failed"), ("duration_s", "Duration (s)"),
    ("request_throughput", "Requests/s"), ("output_throughput", "Output tok/s"),
    ("total_token_throughput", "Total tok/s"), ("goodput", "Goodput (req/s)"),
) + tuple((f"{stat}_{name}_ms", f"{stat.replace('median', 'p50')} {name.upper()} (ms)")
          for name in LATENCIES for stat in Summary.STATS)


def compare_table(results: dict[str, dict]) -> str:
    """Labeled result JSONs side by side; every column after the first also shows its ratio to
    the first (baseline) column."""
    labels = list(results)
    header = ["metric"] + labels
    rows = [header]
    for key, title in COMPARE_METRICS:
        base = results[labels[0]].get(key) if labels else None
        row = [title]
        for i, label in enumerate(labels):
            value = results[label].get(key)
            cell = _fmt(value)
            numeric = isinstance(value, (int, float)) and isinstance(base, (int, float))
            if i > 0 and numeric and base:
                cell += f" (x{value / base:.2f})"
            row.append(cell)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def write_json(result: BenchResult, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result.to_dict(), f, indent=2, allow_nan=False)


def main(args: argparse.Namespace) -> int:
    cfg = BenchConfig.from_args(args)
    try:
        result = asyncio.run(run_benchmark(cfg))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    if args.result_json:
        write_json(result, args.result_json)
        print(f"results written to {args.result_json}", file=sys.stderr)
    if args.plot:
        plot_result(result, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0 if result.completed > 0 else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m cluster.bench.harness", description=__doc__)
    add_bench_args(_parser)
    sys.exit(main(_parser.parse_args()))
