"""Tandem: serve ERNIE-4.5-VL behind an OpenAI-compatible API (`tandem serve`)."""

from __future__ import annotations

__version__ = "0.1.0"
