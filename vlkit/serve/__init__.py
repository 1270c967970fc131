"""Serving: an OpenAI-compatible chat-completions API with continuous batching and an optional guard."""

from vlkit.serve.app import APIError, ServeLimits, create_app
from vlkit.serve.engine import Engine, Request

__all__ = ["APIError", "ServeLimits", "create_app", "Engine", "Request"]
