"""Comparison studies: each runs a baseline and the new thing in the same run, prints the
ratio, and writes JSON and a PNG plot. Run with `disagg-serve bench-suite NAME`.

A study is a module with add_args(parser) and main(args), or "module:NAME" where NAME is an
object of that module with those two (one module holding several studies). load_study
imports a study's module by name when that study is asked for."""

import importlib

STUDIES = {
    "grpc-overhead": "cluster.bench.studies.grpc_overhead",
    "kv-transport": "cluster.bench.studies.kv_transport",
    "disagg-vs-colocated": "cluster.bench.studies.disagg_vs_colocated",
    "tetris": "cluster.bench.studies.tetris",
    "migration-downtime": "cluster.bench.studies.migration:DOWNTIME",
    "migration-skew": "cluster.bench.studies.migration:SKEW",
}


def load_study(name: str):
    """The object with add_args and main for study `name`."""
    module, _, attr = STUDIES[name].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded
