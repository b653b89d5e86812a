"""JSON from bytes, as :func:`json.loads` reads it, sooner for the usual UTF-8 body.

``json.loads(raw)`` of bytes first guesses their encoding (UTF-8, -16 or -32) and decodes
them with the ``surrogatepass`` error handler: about 4 us more than ``json.loads`` of the
same text on a chat request or reply, paid twice per AI request (the request body at
admission, the response body in the meter).
"""

from __future__ import annotations

import codecs
import json
from typing import Any

__all__ = ["loads"]


def loads(raw: bytes) -> Any:
    """``json.loads(raw)``: the same value, or the same error.

    A body whose first two bytes are not NUL and that does not begin with a UTF-8 BOM is
    one ``json.loads`` would decode as UTF-8; when it decodes strictly, that text is what
    ``surrogatepass`` would have given. Anything else takes ``json.loads`` itself.
    """
    if raw[:1] != b"\0" and raw[1:2] != b"\0" and not raw.startswith(codecs.BOM_UTF8):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return json.loads(text)
    return json.loads(raw)
