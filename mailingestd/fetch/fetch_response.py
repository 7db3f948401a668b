"""FETCH replies of the plain shape ingest asks for, read without imapclient's lexer.

imapclient reads a FETCH reply with a tokenizer that walks every character in Python: 0.1 ms a
message, a tenth of a core at the backlog's rate. Ingest's replies have one shape (a sequence
number, then ``UID``, ``RFC822.SIZE``, ``INTERNALDATE`` and a body section as a literal, in any
order), which one regular expression reads. :func:`parse_plain` answers exactly what
``imapclient.response_parser.parse_fetch_response(data, normalise_times=False, uid_is_key=True)``
answers, or None for anything else (FLAGS, ENVELOPE, quoted escapes, a literal that is not the
last item, lowercase names, an unsolicited update, a repeated UID), which imapclient then reads.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from .message import MONTHS, mail_datetime

# One item: a name we read and its value (a number, a quoted string without escapes, NIL).
_ITEM = rb'(UID|RFC822\.SIZE|INTERNALDATE) (\d+|"[^"\\\r\n]*"|NIL)'
_ITEMS = re.compile(rb" ?" + _ITEM)
# The whole response without a literal: "7 (UID 9 RFC822.SIZE 120)".
_PLAIN = re.compile(rb"(\d+) \((" + _ITEM + rb"(?: " + _ITEM + rb")*)\)")
# The head of a response whose last item is a body section: "7 (UID 9 ... BODY[] {120}".
_WITH_LITERAL = re.compile(rb"(\d+) \(((?:" + _ITEM + rb" )*)(BODY\[(?:HEADER)?\]) \{(\d+)\}")
_DATE = re.compile(rb'" ?(\d{1,2})-(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)-(\d{4}) '
                   rb'(\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)"')


class _Unread(Exception):
    """Not the plain shape: imapclient reads this reply."""


def _internaldate(value: bytes) -> datetime.datetime | None:
    """imapclient's INTERNALDATE (normalise_times off): None for NIL or a date it cannot read."""
    if value == b"NIL":
        return None
    match = _DATE.fullmatch(value)
    if match is None:
        raise _Unread
    day, month, year, hour, minute, second, sign, tz_hours, tz_minutes = match.groups()
    offset = int(tz_hours) * 3600 + int(tz_minutes) * 60
    if offset >= 86400:
        raise _Unread  # imapclient keeps such an offset (its own tzinfo class); let it
    try:  # -0000 too is an offset of 0 here: imapclient reads through email.utils.parsedate_tz
        return mail_datetime(int(year), MONTHS[month.decode()], int(day), int(hour), int(minute), int(second),
                             -offset if sign == b"-" else offset)
    except ValueError:
        return None  # 31-Feb, 24:00:00: imapclient gives None too


def _items(text: bytes, into: dict[bytes, Any]) -> int | None:
    """The items of ``text`` into ``into``; returns the UID, None if there is none."""
    uid = None
    for name, value in _ITEMS.findall(text):
        if name == b"UID":
            if not value.isdigit():
                raise _Unread  # imapclient raises its ProtocolError on a UID that is no number
            uid = int(value)
        elif name == b"RFC822.SIZE":
            into[name] = int(value) if value.isdigit() else (None if value == b"NIL" else value[1:-1])
        else:
            into[name] = _internaldate(value)
    return uid


def parse_plain(data: list[Any]) -> dict[int, dict[bytes, Any]] | None:
    """The messages of imaplib's untagged FETCH ``data`` keyed by UID, each ``{b"SEQ": n, item:
    value}`` as imapclient gives them; None when any response is not of the plain shape."""
    parsed: dict[int, dict[bytes, Any]] = {}
    index = 0
    try:
        while index < len(data):
            element = data[index]
            if isinstance(element, tuple):
                head, literal = element
                match = _WITH_LITERAL.fullmatch(head)
                if (match is None or index + 1 >= len(data) or data[index + 1] != b")"
                        or not isinstance(literal, bytes) or len(literal) != int(match.group(6))):
                    return None
                seq, items, section = match.group(1), match.group(2), match.group(5)
                index += 2
            else:
                match = _PLAIN.fullmatch(element) if isinstance(element, bytes) else None
                if match is None:
                    return None
                seq, items, section, literal = match.group(1), match.group(2), None, None
                index += 1
            message: dict[bytes, Any] = {b"SEQ": int(seq)}
            uid = _items(items, message)
            if uid is None or uid in parsed:
                return None  # an update without a UID, or a second response for one message
            if section is not None:
                message[section] = literal
            parsed[uid] = message
    except _Unread:
        return None
    return parsed
