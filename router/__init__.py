"""The front door and the brain of a deployment: front ends (gRPC + HTTP, validation,
tokenization, streams; frontend.py) and the global scheduler (registry, dispatch, live
migration, drain, respawn; scheduler.py), with their pure policies (freeness, dispatcher)."""
