"""Header fields of one raw RFC 5322 message, parsed best effort.

The raw bytes are the record; these fields are an index over them. A header that does not
parse (bad RFC 2047, 8-bit garbage, a 1 MB line) yields a degraded string, never an exception,
so a broken message still costs at most its own metadata, never its bytes.
"""

from __future__ import annotations

import datetime
import email.header
import email.parser
import email.policy
import email.utils
import re

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


# The fields read, by their lowercased names.
_WANTED = frozenset(("message-id", "from", "to", "cc", "subject", "date", "in-reply-to", "references"))
# How email.feedparser reads a header section: lines end in CR LF, CR or LF; a line that starts
# with a field name and a colon, white space (a continuation) or "From " (a Unix envelope line)
# belongs to the header, any other line ends it (the stdlib's headerRE).
_LINES = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+")
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
# RFC 5322's date as nearly every mailer writes it ("Tue, 05 Mar 2024 10:15:00 +0000").
_DATE = re.compile(r"(?:[A-Za-z]{3}, )?(\d{1,2}) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                   r"(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)")
MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}


def _ascii_fields(block: bytes) -> dict[str, str] | None:
    """The first value of each wanted field of an ASCII header section, exactly as the stdlib's
    compat32 parser gives it (``Message.get``), at a tenth of its cost: ingest reads every
    message's header. None when the section is not ASCII: the stdlib reads that (8-bit text
    comes back as its ``Header`` objects, which only it makes)."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        return None
    fields: dict[str, str] = {}
    name: str | None = None  # the field whose lines are being read; None: lines are dropped
    lines: list[str] = []
    for line in [*_LINES.findall(text), ""]:  # "": no header line, the end of the last field
        header = _HEADER_LINE.match(line) is not None
        if header and line[0] in " \t":
            if name is not None:
                lines.append(line)
            continue
        if name is not None and name in _WANTED and name not in fields:
            fields[name] = (lines[0].lstrip(" \t") + "".join(lines[1:])).rstrip("\r\n")
        if not header:
            break
        name = None
        colon = line.find(":")
        if line.startswith("From ") or colon == 0:
            continue  # an envelope line or a line without a field name: the stdlib skips both
        name, lines = line[:colon].lower(), [line[colon + 1:]]
    return fields


def mail_datetime(year: int, month: int, day: int, hour: int, minute: int, second: int,
                  offset: int | None) -> datetime.datetime:
    """A date as email.utils reads these numbers: its two-digit year rule (applied to the number,
    "0099" too), ``offset`` seconds east of UTC (None: a naive time). Raises ValueError as
    datetime does on a day or time that does not exist."""
    if year < 100:
        year += 1900 if year > 68 else 2000
    tzinfo = None if offset is None else datetime.timezone(datetime.timedelta(seconds=offset))
    return datetime.datetime(year, month, day, hour, minute, second, tzinfo=tzinfo)


def _iso_date(value: str) -> str:
    """``email.utils.parsedate_to_datetime(value).isoformat()``, the common form read directly;
    raises as that does on a date it cannot read."""
    match = _DATE.fullmatch(value)
    if match is None:
        return email.utils.parsedate_to_datetime(value).isoformat()
    day, month, year, hour, minute, second, sign, tz_hours, tz_minutes = match.groups()
    offset = int(tz_hours) * 3600 + int(tz_minutes) * 60
    # -0000: UTC, the sender's zone unknown (RFC 5322 3.3): email.utils gives a naive time
    return mail_datetime(int(year), MONTHS[month], int(day), int(hour), int(minute), int(second),
                         None if offset == 0 and sign == "-" else -offset if sign == "-" else offset).isoformat()


def parse_headers(raw: bytes) -> Headers:
    """Decode the fields the store and the envelope carry; never raises on bad input."""
    block = _header_block(raw)
    try:
        fields = _ascii_fields(block)
        if fields is not None:
            get = fields.get
        else:
            get = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(block).get
    except Exception:  # the stdlib parser is lenient, but a message must never cost the batch
        return Headers()
    date = get("date")
    normalized_date = None
    if date is not None:
        try:
            normalized_date = _iso_date(str(date))
        except Exception:
            normalized_date = _decode(date, MAX_FIELD)
    return Headers(
        message_id=_decode(get("message-id"), MAX_FIELD),
        from_=_decode(get("from"), MAX_ADDRESS_FIELD),
        to=_decode(get("to"), MAX_ADDRESS_FIELD),
        cc=_decode(get("cc"), MAX_ADDRESS_FIELD),
        subject=_decode(get("subject"), MAX_FIELD),
        date=normalized_date,
        in_reply_to=_decode(get("in-reply-to"), MAX_FIELD),
        references=_decode(get("references"), MAX_ADDRESS_FIELD),
    )
