"""Channel vocabulary: the channel identities a run's model knows, and each dataset's channels mapped to them.

A vocabulary is an ordered list of channel identities; id i is the i-th. Each identity goes by one or more
names (`DNA|Hoechst`: the same stain under JUMP-CP's and RxRx's names), so datasets that name a stain
differently map it to the same id. It is given as `data.channels` in the config:

  ""                    the channels of `data.dir`, in their order (one dataset), or, for a mixture
                        (`data.mixture`), every dataset's channel names in order of first appearance
  a preset name         one of PRESETS (the names the builders write: rxrx1, rxrx3_core, jump_cp, synthetic,
                        and cell_painting, all of them with the same stains merged)
  "A|A2,B,C"            explicit identities, comma-separated; `|` separates the names of one identity

The ids are what the channel-agnostic model (ca_mae) gets as `channel_ids`: they pick its channel
embedding and its per-channel decoder, so a CA-MAE trained on a mixture needs `model.in_channels` equal to
the vocabulary's size (maejax.input_pipeline checks it). The trainer stores the resolved vocabulary in every
checkpoint's meta (`channels`), where eval finds it (`select`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

RXRX = ("Hoechst", "ConA", "Phalloidin", "Syto14", "MitoTracker", "WGA")        # data.sources.rxrx1
JUMP_CP = ("DNA", "ER", "RNA", "AGP", "Mito", "Brightfield", "HighZBF", "LowZBF")  # FileName_Orig<name>
SYNTHETIC = ("DNA", "ER", "RNA", "AGP", "Mito", "Golgi")                         # data.cell_renderer.STAINS
PRESETS: dict[str, tuple[str, ...]] = {
    "rxrx1": RXRX,
    "rxrx3_core": RXRX,
    "jump_cp": JUMP_CP,
    "synthetic": SYNTHETIC,
    # The Cell Painting dyes under both naming schemes: Hoechst stains DNA, concanavalin A the ER, SYTO 14
    # RNA, MitoTracker mitochondria (JUMP's AGP is phalloidin + WGA in one channel; RxRx images them apart).
    "cell_painting": ("DNA|Hoechst", "ER|ConA", "RNA|Syto14", "AGP", "Mito|MitoTracker", "Golgi", "Phalloidin",
                      "WGA", "Brightfield", "HighZBF", "LowZBF"),
}


class ChannelError(ValueError):
    """A channel name the vocabulary does not know, or a channel selection that does not fit: one line naming
    the dataset (or key) and the channel."""


class MixtureError(ValueError):
    """data.dir / data.mixture do not name a usable set of training datasets (maejax.input_pipeline
    .parse_mixture): one line naming the key and the value."""


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    identities: tuple[tuple[str, ...], ...]   # per id, the names it goes by (the first is its label)

    def __post_init__(self):
        seen: dict[str, int] = {}
        for i, names in enumerate(self.identities):
            for name in names:
                if not name:
                    raise ChannelError(f"channel vocabulary {self.spec()!r}: an empty channel name")
                if name in seen:
                    raise ChannelError(f"channel vocabulary {self.spec()!r}: {name!r} names channels {seen[name]} "
                                       f"and {i}")
                seen[name] = i

    def __len__(self) -> int:
        return len(self.identities)

    @property
    def labels(self) -> list[str]:
        return [names[0] for names in self.identities]

    def spec(self) -> str:
        """The `data.channels` string that gives this vocabulary back (what checkpoints store)."""
        return ",".join("|".join(names) for names in self.identities)

    def id_of(self, name: str) -> int | None:
        return next((i for i, names in enumerate(self.identities) if name in names), None)

    def ids(self, channels: Sequence[str], where: str) -> list[int]:
        """The id of each of a dataset's `channels`; a name the vocabulary lacks is a ChannelError naming
        `where` (the dataset) and the channel."""
        out = []
        for name in channels:
            i = self.id_of(name)
            if i is None:
                raise ChannelError(f"{where}: channel {name!r} is not in the channel vocabulary [{self.spec()}]; "
                                   f"add it to data.channels (names of one channel joined by '|', e.g. DNA|Hoechst) "
                                   f"or use a preset that has it ({', '.join(PRESETS)})")
            out.append(i)
        if len(set(out)) != len(out):
            i = next(i for i in out if out.count(i) > 1)
            both = " and ".join(repr(n) for n, j in zip(channels, out) if j == i)
            raise ChannelError(f"{where}: channels {list(channels)} name the same vocabulary channel twice ({both} "
                               f"are both {self.labels[i]!r})")
        return out


def parse(spec: str, datasets_channels: Sequence[Sequence[str]] = ()) -> Vocabulary:
    """The vocabulary of `data.channels` = spec; "" takes `datasets_channels` (each dataset's channel names,
    in mixture order) in order of first appearance."""
    spec = (spec or "").strip()
    if not spec:
        names: list[str] = []
        for channels in datasets_channels:
            names += [c for c in channels if c not in names]
        if not names:
            raise ChannelError("data.channels is empty and there is no dataset to take the channels from")
        return Vocabulary(tuple((n,) for n in names))
    if spec in PRESETS:
        entries = PRESETS[spec]
    else:
        entries = tuple(e.strip() for e in spec.split(","))
    return Vocabulary(tuple(tuple(n.strip() for n in e.split("|")) for e in entries))


def select(vocabulary: Vocabulary | None, dataset_channels: Sequence[str], wanted: str, where: str,
           *, fixed: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
    """Which of a dataset's channels go to a model, in which order, and their vocabulary ids:
    (indices into the dataset's channels, ids).

    `wanted` ("" or comma-separated names, `eval.channels`): "" = all of the dataset's channels in its order;
    names are matched through the vocabulary's aliases. `fixed` (a fixed-channel model: its training
    channels, in order) takes exactly those channels, in that order, found by name in the dataset whatever
    its order. `vocabulary` None (a run from before vocabularies, a converted model): ids are positions.
    """
    def key(name: str):
        i = vocabulary.id_of(name) if vocabulary is not None else None
        return ("id", i) if i is not None else ("name", name)

    index = {key(c): j for j, c in enumerate(dataset_channels)}
    names = [n.strip() for n in wanted.split(",")] if wanted and wanted.strip() else None
    if fixed is not None:
        if names is not None and [key(n) for n in names] != [key(n) for n in fixed]:
            raise ChannelError(f"eval.channels={wanted!r}: the fixed-channel model takes exactly its training channels "
                               f"{list(fixed)} in that order; evaluate a channel subset with a channel-agnostic model "
                               f"(model.name=ca_mae)")
        names = list(fixed)
    if names is None:
        indices = list(range(len(dataset_channels)))
    else:
        missing = [n for n in names if key(n) not in index]
        if missing:
            raise ChannelError(f"{where}: no channel {missing[0]!r} among its channels {list(dataset_channels)}"
                               + ("" if fixed is None else " (the model was trained on " + ", ".join(fixed) + ")"))
        if len({key(n) for n in names}) != len(names):
            raise ChannelError(f"eval.channels={wanted!r}: a channel is named twice")
        indices = [index[key(n)] for n in names]
    chosen = [dataset_channels[j] for j in indices]
    ids = vocabulary.ids(chosen, where) if vocabulary is not None else indices
    return indices, ids
