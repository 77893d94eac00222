"""Replicas sharing a Redis (moved here from replicas.py, to be split by subsystem)."""

from .streams import STREAM_EVENTS, Replicas

__all__ = ["STREAM_EVENTS", "Replicas"]
