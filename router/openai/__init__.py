"""The OpenAI-compatible HTTP API (completions, chat completions, models, health, metrics),
served by any front end that can stream a validated request (backend.py)."""
