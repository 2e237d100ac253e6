"""pushsvc: push trading and market events from Kafka to WebSocket clients."""

from .errors import AuthError, ConfigError, PushError

__version__ = "0.1.0"

__all__ = ["AuthError", "ConfigError", "PushError", "__version__"]
