"""What the creator and the worker agree on about pickled items and results."""

from __future__ import annotations

#: Values whose pickle never refers to a class by name, so the C pickler is safe for them.
PLAIN_TYPES = frozenset({int, float, complex, str, bytes, bool, type(None)})
