"""Header fields of one raw RFC 5322 message, parsed best effort.

The raw bytes are the record; these fields are an index over them. A header that does not
parse (bad RFC 2047, 8-bit garbage, a 1 MB line) yields a degraded string, never an exception,
so a broken message still costs at most its own metadata, never its bytes.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import email.utils

from ..envelope import Headers

# Bounds keep one hostile header from bloating rows and queue envelopes.
MAX_FIELD = 2048
MAX_ADDRESS_FIELD = 8192
MAX_HEADER_BYTES = 256 * 1024


def _header_block(raw: bytes) -> bytes:
    """The header section only: parsing a 50 MB body to read ten fields is waste."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = raw.find(sep, 0, MAX_HEADER_BYTES)
        if end != -1:
            return raw[: end + len(sep)]
    return raw[:MAX_HEADER_BYTES]


def _decode(value: object, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value)
    if "=?" in text:  # RFC 2047 encoded words; without one, decoding would return the text as it is
        try:
            text = str(email.header.make_header(email.header.decode_header(text)))
        except Exception:  # any malformed encoded-word: keep the undecoded text
            text = str(value)
    text = " ".join(text.replace("\x00", "").split())
    return text[:limit]


def parse_headers(raw: bytes) -> Headers:
    """Decode the fields the store and the envelope carry; never raises on bad input."""
    try:
        msg = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(_header_block(raw))
        get = msg.get
    except Exception:  # the stdlib parser is lenient, but a message must never cost the batch
        return Headers()
    date = get("Date")
    normalized_date = None
    if date is not None:
        try:
            normalized_date = email.utils.parsedate_to_datetime(str(date)).isoformat()
        except Exception:
            normalized_date = _decode(date, MAX_FIELD)
    return Headers(
        message_id=_decode(get("Message-ID"), MAX_FIELD),
        from_=_decode(get("From"), MAX_ADDRESS_FIELD),
        to=_decode(get("To"), MAX_ADDRESS_FIELD),
        cc=_decode(get("Cc"), MAX_ADDRESS_FIELD),
        subject=_decode(get("Subject"), MAX_FIELD),
        date=normalized_date,
        in_reply_to=_decode(get("In-Reply-To"), MAX_FIELD),
        references=_decode(get("References"), MAX_ADDRESS_FIELD),
    )
