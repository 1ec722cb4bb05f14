"""Deterministic sample content for disk images: incompressible and text-like bytes.

Shared by ``scripts/demo.py`` and ``bench/convert.py`` (which puts this directory on
``sys.path``). Everything here is a pure function of a seed, so two machines build
byte-identical images and benchmark numbers stay comparable.
"""

from __future__ import annotations

import hashlib
import random

MiB = 1 << 20

# A small English-like vocabulary: text built from it compresses roughly like real
# prose (zlib ~3x), which is what matters for the compressed-output cases.
_VOCABULARY = """
    the of and to in is was for that on with as by at from his her they this which
    be have had not are were but or an it all one their has been would there when
    who will more no if out so what up said about into than them can only other new
    some could time these two may then do first any my now such like our over man me
    even most made after also did many before must through back years where much your
    way well down should because each just those people how too little state good
    very make world still own see men work long get here between both life being under
    never day same another know while last might us great old year off come since
    against go came right used take three disk image cluster sector block table header
    volume partition kernel boot machine virtual format snapshot backing file offset
    length zero data write read convert compress extent refcount layer guest host
    network memory processor device driver system user group config service package
"""
WORDS: tuple[str, ...] = tuple(_VOCABULARY.split())


def random_bytes(seed: int, index: int, size: int) -> bytes:
    """``size`` incompressible bytes, a pure function of (seed, index).

    SHAKE-128 runs at ~300 MiB/s here, 2-3x faster than ``random.randbytes`` or
    numpy's bit generators, and is reproducible everywhere.
    """
    return hashlib.shake_128(f"vmforge-sample:{seed}:{index}".encode()).digest(size)


def generate_text(rng: random.Random, size: int) -> bytes:
    """About ``size`` bytes (exactly ``size``) of paragraphs of English-like sentences."""
    parts: list[str] = []
    total = 0
    while total < size:
        sentences = []
        for _ in range(rng.randint(3, 7)):
            words = rng.choices(WORDS, k=rng.randint(6, 16))
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), str(rng.randrange(100000)))
            sentence = " ".join(words)
            sentences.append(sentence[0].upper() + sentence[1:] + rng.choice(".......?!"))
        paragraph = " ".join(sentences) + "\n\n"
        parts.append(paragraph)
        total += len(paragraph)
    return "".join(parts).encode()[:size]


class TextPool:
    """A seeded pool of text from which chunks of any size are cut cheaply.

    Generating text word by word runs at a few MiB/s, too slow for a 2 GiB image, so
    chunks are slices of one pool at seeded offsets. Compressors see clusters of 64 KiB
    at most, far below the pool size, so reuse does not change compression ratios.
    """

    def __init__(self, seed: int, size: int = 4 * MiB) -> None:
        self._pool = generate_text(random.Random(seed), size)
        # Doubled so a slice that wraps around is one contiguous copy.
        self._doubled = self._pool + self._pool

    def chunk(self, index: int, size: int) -> bytes:
        """``size`` bytes of text, a pure function of (pool seed, index)."""
        if size > len(self._pool):
            reps = -(-size // len(self._pool)) + 1
            return (self._pool * reps)[index % len(self._pool) :][:size]
        start = int.from_bytes(hashlib.sha256(f"text:{index}".encode()).digest()[:8], "little")
        start %= len(self._pool)
        return self._doubled[start : start + size]
