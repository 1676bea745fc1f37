"""HTTP only: routes, the OpenAI protocol, error mapping, metrics endpoint, CLI. Knows nothing of torch."""

from server.app import create_app

__all__ = ["create_app"]
