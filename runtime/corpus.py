"""Built-in text: Python's own documentation topics, always installed with CPython.

It is the default calibration corpus (``sparsify.calibration``) and the prompt a decoder
artifact is profiled after (``targets/cpu/profile.py``). It needs only the standard
library, so it sits in the runtime, which every other package may import.
"""

from __future__ import annotations


def pydoc_text() -> str:
    """The text of ``pydoc_data.topics`` (about 750 KB of English technical prose)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
