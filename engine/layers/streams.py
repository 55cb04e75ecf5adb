"""A side stream for decode work that may overlap the main stream's latency-bound kernels.

``beside(device)`` runs its block on the device's side stream, after everything already queued
on the current stream (or, with ``after``, after that event and what the side stream already
holds); ``join(device)`` makes the current stream wait for the side stream.
Under CUDA-graph capture the fork and join become graph edges; every fork must be joined
before the capture ends (the model joins once at the end of its forward).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SIDE: dict[torch.device, torch.cuda.Stream] = {}
_FORKED: set[torch.device] = set()  # forked since the last join (capture may not wait on
# an event recorded outside it, so join only after a fork)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE.get(device)
    if stream is None:
        stream = _SIDE[device] = torch.cuda.Stream(device)
    return stream


@contextmanager
def beside(
    device: torch.device, after: torch.cuda.Event | None = None
) -> Iterator[torch.cuda.Stream]:
    """Run the block on the side stream, ordered after the current stream's queued work, or
    only after the event `after` (recorded on the current stream) where given."""
    side = side_stream(device)
    if after is None:
        side.wait_stream(torch.cuda.current_stream(device))
    else:
        side.wait_event(after)
    _FORKED.add(device)
    with torch.cuda.stream(side):
        yield side


def join(device: torch.device) -> None:
    """The current stream waits for everything queued on the side stream since the last fork."""
    if device in _FORKED:
        _FORKED.discard(device)
        torch.cuda.current_stream(device).wait_stream(_SIDE[device])
