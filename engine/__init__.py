"""Tandem's torch runtime: the ERNIE-4.5 models, the paged-KV engine, the offline API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "SamplingParams"]

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import engine.config` must not pull in torch-heavy modules.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
