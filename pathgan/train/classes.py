"""The classes of a conditional run: read from the shard set, checked before training starts.

The classes are the labels the shard set's manifest lists (all splits, sorted), each a code
``0 .. C-1`` in the networks. The training split must hold labelled samples only, and some of
every class: otherwise one line says what is wrong and how to pack it. ``mix`` is how often
each class is drawn, for fake samples and (``balanced``) for real ones: as the training split
has them (``data.class_balance: sampled``) or equally often (``balanced``).
"""

from dataclasses import dataclass

from pathgan.config import Config
from pathgan.core.errors import PathganError
from pathgan.shards.format import UNLABELLED, load_manifest, split_labels
from pathgan.shards.reading import sample_labels, split_entries


@dataclass(frozen=True)
class Classes:
    names: tuple[str, ...]
    counts: tuple[int, ...]  # samples of each class in the training split
    balance: str  # "sampled" | "balanced"

    @property
    def mix(self) -> tuple[float, ...]:
        """The probability of each class in a training batch."""
        if self.balance == "balanced":
            return tuple(1.0 / len(self.names) for _ in self.names)
        total = sum(self.counts)
        return tuple(count / total for count in self.counts)

    def describe(self) -> str:
        return ", ".join(f"{name} ({count})" for name, count in zip(self.names, self.counts,
                                                                    strict=True))


def label_counts(shards_dir: str, split: str) -> dict[str, int]:
    """Samples per label of a split (:data:`UNLABELLED` for those without): from the manifest,
    or, for a set packed before manifests counted labels per split, from the samples'
    metadata (their ``.json`` members only)."""
    counts = split_labels(load_manifest(shards_dir), split)
    if counts is not None:
        return counts
    found: dict[str, int] = {}
    for path, entries in split_entries(shards_dir, split):
        for label in sample_labels(path, entries):
            key = UNLABELLED if label is None else label
            found[key] = found.get(key, 0) + 1
    return found


def training_classes(config: Config) -> Classes:
    """The classes of ``config``'s shard set, checked for conditional training (one-line errors
    for a set without labels, unlabelled training samples or a class missing from training)."""
    shards, split = config.data.shards, config.data.split
    counts = {split_name: label_counts(shards, split_name) for split_name in ("train", "val")}
    names = sorted(({*counts["train"], *counts["val"]}) - {UNLABELLED})
    if not names:
        raise PathganError(f"model.conditional needs labelled samples, and {shards} has none: "
                           "pack with --annotations (ASAP polygons), class folders "
                           "(patches/<class>/*.png) or --label-column")
    unlabelled = counts[split].get(UNLABELLED, 0)
    if unlabelled:
        raise PathganError(f"{unlabelled} of the {sum(counts[split].values())} {split} samples of "
                           f"{shards} have no label: pack with --labelled-only, or train "
                           "unconditionally")
    missing = [name for name in names if not counts[split].get(name)]
    if missing:
        raise PathganError(f"class {missing[0]!r} has no samples in the {split} split of "
                           f"{shards} (it has only {', '.join(sorted(counts[split]))}): "
                           "a conditional generator cannot learn it")
    return Classes(tuple(names), tuple(counts[split][name] for name in names),
                   config.data.class_balance)
