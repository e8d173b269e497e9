"""Shared parts of disagg-serve: config, engine wrapper, workers, launcher, CLI, client."""

__version__ = "0.1.0"
