"""Feature descriptors: which backbone features a head reads.

A descriptor is a small JSON-able dict, stored in every exported segmenter's metadata and in every feature
cache key, so that `compare` and the cache build exactly the features a head was trained on::

    {"kind": "tokens", "layer": -1}              # normed patch tokens of one block (the default)
    {"kind": "keys", "blocks": [-3, -2, -1]}     # attention keys of these blocks, heads merged, patches only

`canonical_descriptor` checks a descriptor and returns its one canonical form (sorted keys, ints), and
`descriptor_id` a short readable string of it (`tokens-L-1`, `keys-B-3_-2_-1`) for folder names.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_DESCRIPTOR: dict[str, Any] = {"kind": "tokens", "layer": -1}
KINDS = {"tokens": ("layer",), "keys": ("blocks",)}


class DescriptorError(ValueError):
    """A feature descriptor is malformed or names features the backbone cannot produce."""


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DescriptorError(f"feature descriptor {where} must be an integer block index, got {value!r}.")
    return int(value)


def canonical_descriptor(descriptor: dict | None, n_blocks: int | None = None) -> dict[str, Any]:
    """Checked copy of ``descriptor`` (None -> the default). With ``n_blocks``, block indices are checked too.

    Raises DescriptorError naming the key and the valid values.
    """
    if descriptor is None:
        descriptor = DEFAULT_DESCRIPTOR
    if not isinstance(descriptor, dict):
        raise DescriptorError(f"feature descriptor must be a mapping such as {json.dumps(DEFAULT_DESCRIPTOR)}, "
                              f"got {descriptor!r}.")
    kind = descriptor.get("kind")
    if kind not in KINDS:
        raise DescriptorError(f"feature descriptor kind {kind!r} is unknown; use one of {sorted(KINDS)}.")
    unknown = sorted(set(descriptor) - {"kind", *KINDS[kind]})
    if unknown:
        raise DescriptorError(f"feature descriptor of kind {kind!r} has unknown keys {unknown}; it takes "
                              f"{list(KINDS[kind])}.")
    if kind == "tokens":
        blocks = [_int(descriptor.get("layer", -1), "'layer'")]
        out = {"kind": "tokens", "layer": blocks[0]}
    else:
        raw = descriptor.get("blocks")
        if not isinstance(raw, (list, tuple)) or not raw:
            raise DescriptorError(f"feature descriptor 'blocks' must be a non-empty list of block indices, "
                                  f"got {raw!r}.")
        blocks = [_int(b, "'blocks'") for b in raw]
        out = {"kind": "keys", "blocks": blocks}
    if n_blocks is not None:
        bad = [b for b in blocks if not -n_blocks <= b < n_blocks]
        if bad:
            raise DescriptorError(f"feature descriptor {json.dumps(out)} names blocks {bad}, but the backbone has "
                                  f"{n_blocks} blocks (valid indices {-n_blocks}..{n_blocks - 1}).")
    return out


def descriptor_id(descriptor: dict | None) -> str:
    """Short readable id of a descriptor, e.g. ``tokens-L-1`` or ``keys-B-3_-2_-1``."""
    d = canonical_descriptor(descriptor)
    if d["kind"] == "tokens":
        return f"tokens-L{d['layer']}"
    return "keys-B" + "_".join(str(b) for b in d["blocks"])


def feature_dim(descriptor: dict | None, embed_dim: int) -> int:
    """Channels of the features a descriptor names, for a backbone of width ``embed_dim``."""
    d = canonical_descriptor(descriptor)
    return embed_dim if d["kind"] == "tokens" else embed_dim * len(d["blocks"])
