"""User and file text shown in the app: always literal, never Markdown.

Streamlit renders the text of ``st.markdown``, ``st.success``, ``st.error``, captions and the like
as Markdown (with links, images, colour and icon directives, LaTeX). Names, comments, file names
and header values quoted in messages come from users or files: ``![x](http://host/...)`` would
make every other user's browser fetch an outside URL. ``md_escape`` backslash-escapes every ASCII
punctuation character (CommonMark renders an escaped one literally) and flattens line breaks.
"""

from __future__ import annotations

import re
import string
from datetime import datetime

_PUNCTUATION = re.compile("([" + re.escape(string.punctuation) + "])")


def md_escape(text: object) -> str:
    """``text`` as Markdown that renders exactly as the characters given, on one line."""
    flat = " ".join(str(text).split())
    return _PUNCTUATION.sub(r"\\\1", flat)


def fmt_time(value: datetime | None) -> str:
    """A stored time (UTC) as the pages show it; "" for none."""
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else ""
