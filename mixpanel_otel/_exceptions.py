"""The package's one exception type."""

from __future__ import annotations

__all__ = ["MixpanelException"]


class MixpanelException(Exception):  # noqa: N818 - the official SDK's name, kept for drop-in use
    """Bad arguments at a call, or a failed delivery with ``sync=True``.

    The text never contains the project token.
    """
