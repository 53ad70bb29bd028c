"""The global training batch, assembled from a fixed number of independent input streams.

Stream s is the input pipeline's slice s of `num_streams` (records s, s + S, ...; its own shuffle), yielding
batch_size / S examples per step; the global batch is streams 0..S-1 concatenated in order. Each process
reads a contiguous block of S / process_count streams, which is exactly its block of rows in the global
array (`jax.make_array_from_process_local_data` with the batch split over (data, fsdp)). So the examples
of every step depend on S alone, not on how many processes read them: a two-process run sees the same
batches as a one-process run with the same S, and a checkpoint (one small JSON state per stream) can be
resumed by a different number of processes.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterator

import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class StreamedBatches:
    """This process's share of the global batch: the concatenation of its streams' batches."""

    def __init__(self, make_stream: Callable[[int, int], Iterator], num_streams: int, batch_size: int,
                 process_index: int, process_count: int):
        """make_stream(stream_index, num_streams) -> an iterator of dict batches of batch_size / num_streams
        examples, with get_state/set_state (the input pipeline's train iterator over slice stream_index)."""
        if num_streams < 1 or num_streams % process_count:
            raise ValueError(f"data.streams={num_streams} must be a positive multiple of the {process_count} "
                             f"processes (each process reads the same number of streams)")
        if batch_size % num_streams:
            raise ValueError(f"data.batch_size={batch_size} is not divisible by data.streams={num_streams}")
        per_process = num_streams // process_count
        self.num_streams = num_streams
        self.streams = list(range(process_index * per_process, (process_index + 1) * per_process))
        self._iterators = [make_stream(s, num_streams) for s in self.streams]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self._iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self) -> dict[int, Any]:
        return {s: it.get_state() for s, it in zip(self.streams, self._iterators)}

    def set_state(self, states: dict[int, Any]) -> None:
        for s, it in zip(self.streams, self._iterators):
            it.set_state(states[s])


def _state_file(directory: epath.Path, stream: int, num_streams: int) -> epath.Path:
    return directory / f"stream_{stream:05d}-of-{num_streams:05d}.json"


class StreamStateHandler(ocp.CheckpointHandler):
    """Orbax item: one JSON file per stream, written by the process that reads it.

    The states are taken on the training thread when the save is requested (`StreamStateSave`), so an
    asynchronous save can never record a later position of the iterators.
    """

    def save(self, directory: epath.Path, args: "StreamStateSave") -> None:
        for stream, state in args.states.items():
            _state_file(directory, stream, args.num_streams).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: "StreamStateRestore") -> dict[int, Any]:
        states = {}
        for stream in args.streams:
            path = _state_file(directory, stream, args.num_streams)
            if not path.exists():
                saved = sorted(p.name for p in directory.glob("stream_*.json"))[:3]
                raise ValueError(
                    f"{directory}: no input state for stream {stream} of {args.num_streams} (found {saved}...); "
                    f"resume with the data.streams the checkpoint was written with")
            states[stream] = json.loads(path.read_text())
        return states

    def structure(self, directory: epath.Path):  # required by orbax, unused
        return None

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(StreamStateHandler, for_save=True)
@dataclasses.dataclass
class StreamStateSave(ocp.args.CheckpointArgs):
    states: dict[int, Any]
    num_streams: int


@ocp.args.register_with_handler(StreamStateHandler, for_restore=True)
@dataclasses.dataclass
class StreamStateRestore(ocp.args.CheckpointArgs):
    streams: list[int]
    num_streams: int
