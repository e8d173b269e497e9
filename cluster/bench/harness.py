"""`disagg-serve bench`: load-test a running server over gRPC, in the style of `vllm bench serve`.

Requests arrive on a Poisson (or gamma, for burstiness) schedule; each one is a streamed Generate
call timed on the client: TTFT, per-token ITL, TPOT and E2E latency, plus throughput and goodput.
This module is the command: its flags, building the prompts against the server, driving the
requests on schedule, and writing the results. The parts live next to it: workload (arrivals,
lengths, prompts), recorder (one timed stream), records (the math), report and plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import grpc
import numpy as np
from tqdm import tqdm

from cluster.bench.plots import plot_result
from cluster.bench.recorder import StreamRecorder
from cluster.bench.records import BenchResult, RequestRecord, build_result
from cluster.bench.report import format_rate, format_table
from cluster.bench.workload import (
    Prompt,
    arrival_offsets,
    corpus_passages,
    corpus_passages_exact,
    cut_corpus,
    random_prompts,
    sample_lengths,
    stdlib_corpus,
)
from cluster.client import AsyncClient
from cluster.models.tokenizer import load_tokenizer_file

# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BenchConfig:
    """What one run is asked to do: the `disagg-serve bench` flags."""

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
        return self.label or f"{self.dataset}-rate{format_rate(self.request_rate)}"


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


# ---------------------------------------------------------------- prompts


def load_local_tokenizer(model: str):
    """The server's tokenizer when its model directory is readable here (same machine or a
    shared disk); None otherwise."""
    if not os.path.isfile(os.path.join(model, "tokenizer.json")):
        return None
    try:
        return load_tokenizer_file(model)
    except Exception:  # noqa: BLE001 - any problem: fall back to the server-measured ratio
        return None


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
        prompts = corpus_passages_exact(input_lens, output_lens, tokenizer, rng, text)
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
    prompts = corpus_passages(input_lens, output_lens, chars_per_token, rng, text)
    return prompts, f"server-measured ratio, {chars_per_token:.2f} chars/token (approximate)"


# ---------------------------------------------------------------- driving the server


async def _run_request(client: AsyncClient, prompt: Prompt, cfg: BenchConfig,
                       record: RequestRecord, t0: float, limiter) -> RequestRecord:
    # The send time is taken inside the limiter: waiting for a --max-concurrency slot is the
    # client's queue, not the server's latency.
    async with limiter:
        await StreamRecorder(client, prompt.prompt, prompt.output_len,
                             temperature=cfg.temperature, ignore_eos=cfg.ignore_eos,
                             t0=t0, record=record).task
    return record


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


async def run_benchmark(cfg: BenchConfig) -> BenchResult:
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


async def _drive(client: AsyncClient, cfg: BenchConfig, prompts: list[Prompt], offsets: np.ndarray):
    """Sends each prompt at its arrival time; returns the records and the wall time taken."""
    limiter = (asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency
               else contextlib.nullcontext())
    records = [RequestRecord(i, p.input_len, p.output_len, scheduled_s=float(o))
               for i, (p, o) in enumerate(zip(prompts, offsets, strict=True))]
    bar = tqdm(total=len(prompts), file=sys.stderr, disable=not cfg.progress, unit="req",
               desc=cfg.display_label(), dynamic_ncols=True)
    tasks = []
    t0 = time.perf_counter()
    for prompt, record in zip(prompts, records, strict=True):
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
