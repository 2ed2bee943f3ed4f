"""The package's one public exception type, and the configuration errors under it."""

from __future__ import annotations

__all__ = ["ConfigurationError", "MissingToken", "MixpanelException"]


class MixpanelException(Exception):  # noqa: N818 - the official SDK's name, kept for drop-in use
    """Bad arguments at a call, or a failed delivery with ``sync=True``.

    The text never contains the project token.
    """


class ConfigurationError(MixpanelException):
    """A configuration value is wrong.

    ``from_environment`` says whether the value came from an environment
    variable (the front ends then disable themselves with one error) or from
    an argument (which raises, at construction).
    """

    def __init__(self, message: str, *, from_environment: bool = False) -> None:
        super().__init__(message)
        self.from_environment = from_environment


class MissingToken(ConfigurationError):
    """No project token: neither an argument nor ``MIXPANEL_TOKEN``."""

    def __init__(self) -> None:
        super().__init__(
            "no Mixpanel project token: pass token= or set MIXPANEL_TOKEN", from_environment=True
        )
