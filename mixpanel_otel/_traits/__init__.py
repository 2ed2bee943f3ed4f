"""Computed group traits: counts, sums, distinct counts and values, first/last and
most frequent values, percentiles over rolling windows, kept current on group
profiles as ``$set``.

:mod:`.aggregates` (what a bucket keeps), :mod:`.engine` (windows and when to
emit; no threads, no I/O), :mod:`.store` (the SQLite state file and its lock),
:mod:`.shared` (logging to and aggregating the state shared by a host's
processes), :mod:`.runtime` (engines per consumer, the timer thread, fork and exit).
"""

from .engine import TraitEngine
from .runtime import TraitFeed, feed_for, finish, held_observations

__all__ = ["TraitEngine", "TraitFeed", "feed_for", "finish", "held_observations"]
