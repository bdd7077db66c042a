"""`blitzgen serve`: an OpenAI-compatible HTTP server with continuous batching.

    app.py        FastAPI routes: parse, validate, submit, format (completions, chat, models, health, metrics)
    protocol.py   the request bodies, their validation, OpenAI's error body
    engine.py     the one thread that owns the Generator and runs the scheduler's plans on it
    scheduler.py  plain-Python continuous batching: which waiting sequence takes which free slot
    metrics.py    Prometheus metrics
"""

from blitzgen.server.app import create_app

__all__ = ["create_app"]
