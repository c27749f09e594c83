"""A small plugin for the serving tests: each adapter is a bag of words, and prompts drawn from it route to it."""

from __future__ import annotations

import random


def train_word_plugin(lib_root, words: dict[str, tuple[str, ...]], other: tuple[str, ...] = ()) -> None:
    """Train a plugin on 40 prompts of 8 random words per adapter in `words` and save it in lib_root/plugin. With
    `other` (words of no adapter), 60 such prompts form the "none of these" class, and the base-model threshold is
    calibrated so that no in-library prompt falls to base."""
    from dlplora.plugin import Plugin, calibrate_base_threshold

    rng = random.Random(0)
    texts, labels = [], []
    for name, bag in words.items():
        for i in range(40):
            texts.append(" ".join(rng.choice(bag) for _ in range(8)) + f" case {i}")
            labels.append(name)
    if other:
        for _ in range(60):
            texts.append(" ".join(rng.choice(other) for _ in range(8)))
            labels.append(None)
    plugin = Plugin.train(texts, labels, list(words), epochs=8, batch_size=32, bits=12, dim=8, hidden=(32, 32, 16),
                          seed=0)
    if other:
        inside = [(t, lab) for t, lab in zip(texts, labels) if lab is not None]
        calibrate_base_threshold(plugin, [t for t, _ in inside], [lab for _, lab in inside], [t for t, _ in inside],
                                 false_rate=0.0)
    plugin.save(lib_root / "plugin")
