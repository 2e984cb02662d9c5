"""Byte-level tokens: every corpus and every task share one 260-id vocabulary.

Bytes need no trained vocabulary, no download and no unknown token, so the same
ids serve the offline default corpus, the user's own files and any TFDS dataset.
Four ids are reserved below the 256 byte values:

        PAD_ID=0       padding; models derive their padding mask from ``ids != PAD_ID``
        EOS_ID=1       end of document; also the BOS / decoder start token
        MASK_ID=2      masked-LM corruption
        SENTINEL_ID=3  one span-corruption sentinel (spans are matched by order)

Byte ``b`` is id ``b + 4``.
"""

from __future__ import annotations

import numpy as np

PAD_ID = 0
EOS_ID = 1
MASK_ID = 2
SENTINEL_ID = 3
NUM_SPECIAL = 4
VOCAB_SIZE = NUM_SPECIAL + 256


def as_bytes(text: str | bytes) -> bytes:
    """Returns ``text`` as bytes (UTF-8 for str): TFDS gives bytes, mocks give str."""
    if isinstance(text, str):
        return text.encode("utf-8")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise ValueError(f"text must be str or bytes, got {type(text).__name__}: {text!r:.80}")


def encode(text: str | bytes) -> np.ndarray:
    """Maps text to int32 ids, one per UTF-8 byte, with no EOS (callers add it)."""
    raw = np.frombuffer(as_bytes(text), dtype=np.uint8)
    return raw.astype(np.int32) + NUM_SPECIAL


def decode(ids) -> str:
    """Maps ids back to text, dropping special ids; bad UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(
            f"token ids must lie in [0, {VOCAB_SIZE}), got values in [{ids.min()}, {ids.max()}]"
        )
    byte_ids = ids[ids >= NUM_SPECIAL] - NUM_SPECIAL
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
