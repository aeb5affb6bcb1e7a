"""Generated text made safe to store and show: no control characters.

A language model's byte-fallback tokens (``<0x00>`` ... ``<0x1F>``, ``<0x7F>``, and the C1 range
once decoded) turn into control characters: NUL, form feed, vertical tab, ^D, ^S... A NUL ends
ffmpeg's parse of a subtitle file (the rest of a film's cues are silently dropped), PostgreSQL's
``text`` type rejects it, and terminals act on the others. Every engine's answer goes through
:func:`clean_text` when it is decoded; only newline and tab, which text legitimately holds, stay.
"""

from __future__ import annotations

import re

# C0 (U+0000-U+001F) without tab and newline, DEL (U+007F) and C1 (U+0080-U+009F): Unicode's
# "Cc" category, the characters with no meaning as text.
CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean_text(text: str) -> tuple[str, int]:
    """``text`` without control characters other than newline and tab; and how many were dropped.

    A carriage return is a control character too: "\\r\\n" becomes "\\n"."""
    cleaned, n = CONTROL_CHARS.subn("", text)
    return cleaned, n
