"""Comparison studies: each runs a baseline and the new thing in the same run, prints the
ratio, and writes JSON and a PNG plot. Run with `disagg-serve bench-suite NAME`.

A study is a module with add_args(parser) and main(args), or "module:NAME" where NAME is an
object of that module with those two (one module holding several studies). load_study
imports a study's module by name when that study is asked for."""

import importlib

STUDIES = {
    "grpc-overhead": "cluster.bench.studies.grpc_overhead",
    "kv-transport": "cluster.bench.studies.kv_transport",
    "kv-push": "cluster.bench.studies.kv_push",
    "disagg-vs-colocated": "cluster.bench.studies.disagg_vs_colocated",
    "tetris": "cluster.bench.studies.tetris",
    "migration-downtime": "cluster.bench.studies.migration:DOWNTIME",
    "migration-skew": "cluster.bench.studies.migration:SKEW",
    "vs-vllm": "cluster.bench.studies.vs_vllm",
    "frontend-capacity": "cluster.bench.studies.frontend_capacity",
    "dispatch-latency": "cluster.bench.studies.dispatch_latency",
    "restart-time": "cluster.bench.studies.restart_time",
    "sim-validation": "cluster.bench.studies.sim_validation",
    "distserve-13b": "cluster.bench.studies.distserve_13b",
    "prefix-reuse": "cluster.bench.studies.prefix_reuse",
}


def load_study(name: str):
    """The object with add_args and main for study `name`."""
    module, _, attr = STUDIES[name].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded
