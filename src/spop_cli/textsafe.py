"""Text from a pop, a change or an action made inert before it reaches a terminal.

A caller sets Asterisk's CallerIDName, an HTTP source sets every field of a pop: written as is, an
escape sequence in one retitles the agent's terminal, clears its screen, colours the rest, plants
a hyperlink; a bidi override shows `invoice‮txt.exe` as `invoiceexe.txt`. rich strips only a few
controls (BEL, backspace, CR…) and passes ESC through. So every such text goes through `inert`
(the live view, the `print` action's panel and summary line, --plain's lines), and into rich only
as `Text` (`field`), never as markup: a `[bold]` in a field stays literal.
"""

from __future__ import annotations

import re
from typing import Any

# Characters shown escaped: C0 controls (ESC, BEL, tab, newline…), DEL and the C1 controls (U+009B
# is CSI on its own); zero-width and bidi marks, line and paragraph separators, bidi embeddings,
# overrides and isolates, the invisible operators; the BOM; interlinear annotations; surrogates (a
# lone one does not even encode); tags. Explicit ranges: the same on every Python (Unicode) version.
UNSAFE = re.compile(
    "[\u0000-\u001f\u007f-\u009f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f"
    "\ufeff\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]"
)


def _escape(match: re.Match[str]) -> str:
    # Python's own escapes, as repr() writes them (--plain's `field='…'`): \t \n \r \x1b \u202e
    return repr(match.group())[1:-1]


def inert(text: str) -> str:
    """`text` with every control, bidi and invisible format character written as its escape."""
    return UNSAFE.sub(_escape, text)


def field(value: Any, style: str = "") -> Any:
    """A rich Text of `value` made inert: never parsed as markup, no control reaches the screen."""
    from rich.text import Text

    return Text(inert(str(value)), style=style)
