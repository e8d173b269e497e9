"""Comparison studies: each runs a baseline and the new thing in the same run, prints the
ratio, and writes JSON and a PNG plot. Run with `disagg-serve bench-suite NAME`."""

STUDIES = {
    "grpc-overhead": "cluster.benchmarks.grpc_overhead",
    "kv-transport": "cluster.benchmarks.kv_transport",
    "disagg-vs-colocated": "cluster.benchmarks.disagg_vs_colocated",
    "tetris": "cluster.benchmarks.tetris",
}
