"""Untrusted input: the one-pass inspector and the limits every reader of strangers'
files relies on (../SECURITY.md)."""

from .inspect import StreamInspector, inspect, inspect_path

__all__ = ["StreamInspector", "inspect", "inspect_path"]
