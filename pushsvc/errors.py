"""The exceptions pushsvc raises; all derive from :class:`PushError`."""


class PushError(Exception):
    """Base class of every error pushsvc raises on purpose."""


class ConfigError(PushError, ValueError):
    """A setting is missing or has a value the service cannot run with.

    The message names the environment variable, the bad value and what to do.
    """


class AuthError(PushError):
    """A client's token was refused; ``reason`` is safe to show to the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
