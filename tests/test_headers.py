"""fetch/message.py reads an ASCII header section and the common date form itself, without the
stdlib's email parser (ingest reads every message's header: the parser cost 124 us a message, a
tenth of a core at the backlog's rate). Its answers must be the stdlib's, to the character: the
oracle below is parse_headers as it was, on email.parser and email.utils alone."""

from __future__ import annotations

import email.parser
import email.policy
import email.utils

from hypothesis import given, settings, strategies as st

from mailingestd.envelope import Headers
from mailingestd.fetch.message import MAX_ADDRESS_FIELD, MAX_FIELD, _decode, _header_block, parse_headers


def stdlib_headers(raw: bytes) -> Headers:
    """The oracle: every field through email.parser's compat32 reading and email.utils' dates."""
    try:
        get = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(_header_block(raw)).get
    except Exception:
        return Headers()
    date = get("Date")
    normalized_date = None
    if date is not None:
        try:
            normalized_date = email.utils.parsedate_to_datetime(str(date)).isoformat()
        except Exception:
            normalized_date = _decode(date, MAX_FIELD)
    return Headers(
        message_id=_decode(get("Message-ID"), MAX_FIELD), from_=_decode(get("From"), MAX_ADDRESS_FIELD),
        to=_decode(get("To"), MAX_ADDRESS_FIELD), cc=_decode(get("Cc"), MAX_ADDRESS_FIELD),
        subject=_decode(get("Subject"), MAX_FIELD), date=normalized_date,
        in_reply_to=_decode(get("In-Reply-To"), MAX_FIELD), references=_decode(get("References"), MAX_ADDRESS_FIELD))


NAMES = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To", "References", "X-Other",
         "from", "SUBJECT", "Received", "", "From ", "Sub ject", "X\x01Y"]
ENDINGS = ["\r\n", "\n", "\r", ""]
TEXT = st.lists(st.sampled_from(list("ab <>@.,;:\t=?_-\"'()\x00\r\n") + ["=?utf-8?q?caf=C3=A9?=",
                                                                     "=?utf-8?B?SsO8cmdlbg==?="]),
                max_size=40).map("".join)


def dates() -> st.SearchStrategy[str]:
    """Dates in and around RFC 5322's form: odd zones, -0000, two-digit years, impossible days."""
    day = st.sampled_from(["Tue, ", "Mon,", "tue, ", "Xyz, ", "", "Tue ", "Tue,  "])
    return st.builds(
        lambda d, dd, mon, yy, hh, mm, ss, zone, tail: f"{d}{dd} {mon} {yy} {hh}:{mm}:{ss} {zone}{tail}",
        day, st.sampled_from(["5", "05", "31", "0", "32", "1"]),
        st.sampled_from(["Mar", "Feb", "mar", "MAR", "Foo", "Dec"]),
        st.sampled_from(["2024", "0099", "0050", "24", "99", "1999", "0000", "10000"]),
        st.sampled_from(["10", "00", "23", "24", "7"]), st.sampled_from(["15", "59", "60"]),
        st.sampled_from(["00", "59", "60"]),
        st.sampled_from(["+0000", "-0000", "+0130", "-0500", "+0090", "+2400", "-2359", "GMT", "EST", "+05", "Z"]),
        st.sampled_from(["", " ", " (CET)", "\r\n "]))


@st.composite
def header_sections(draw: st.DrawFn) -> bytes:
    lines = []
    for _ in range(draw(st.integers(min_value=0, max_value=8))):
        kind = draw(st.sampled_from(["field", "field", "field", "continuation", "date", "junk"]))
        if kind == "field":
            value = draw(TEXT)
            line = f"{draw(st.sampled_from(NAMES))}:{draw(st.sampled_from(['', ' ', '  ', chr(9)]))}{value}"
        elif kind == "continuation":
            line = f"{draw(st.sampled_from([' ', chr(9)]))}{draw(TEXT)}"
        elif kind == "date":
            line = f"Date: {draw(dates())}"
        else:
            line = draw(st.sampled_from([":no name", "From sender@example.org Tue Mar  5", "no colon here", ""]))
        lines.append(line + draw(st.sampled_from(ENDINGS)))
    section = "".join(lines).encode("ascii")
    if draw(st.booleans()):
        section += draw(st.sampled_from([b"\r\n", b"\n", b"\xe9t\xe9", b""])) + b"\r\nbody: not a header\r\n"
    return section


@settings(max_examples=600, deadline=None)
@given(header_sections())
def test_an_ascii_header_section_reads_as_the_stdlib_reads_it(raw):
    assert parse_headers(raw) == stdlib_headers(raw)


@settings(max_examples=400, deadline=None)
@given(dates())
def test_a_date_reads_as_email_utils_reads_it(date):
    raw = f"Subject: s\r\nDate: {date}\r\n\r\n".encode("ascii")
    assert parse_headers(raw).date == stdlib_headers(raw).date


def test_a_section_with_8bit_text_goes_to_the_stdlib():
    raw = b"From: J\xfcrgen <j@example.com>\r\nSubject: caf\xc3\xa9\r\nTo: a@b\r\n\r\nbody"
    headers = parse_headers(raw)
    assert headers == stdlib_headers(raw) and headers.to == "a@b" and headers.from_ is not None


def test_the_common_message_reads_its_fields():
    raw = (b"From: Sender <s@example.org>\r\nTo: Bob <bob@example.net>,\r\n Carol <c@example.net>\r\n"
           b"Subject: =?utf-8?q?caf=C3=A9?= menu\r\nDate: Tue, 05 Mar 2024 10:15:00 +0100\r\n"
           b"Message-ID: <1@example.org>\r\nIn-Reply-To: <0@example.org>\r\n\r\nbody\r\n")
    assert parse_headers(raw) == Headers(
        message_id="<1@example.org>", from_="Sender <s@example.org>", to="Bob <bob@example.net>, Carol <c@example.net>",
        subject="café menu", date="2024-03-05T10:15:00+01:00", in_reply_to="<0@example.org>")
