"""fetch/fetch_response.py reads ingest's plain FETCH replies itself (imapclient's lexer cost
0.1 ms a message). It must answer exactly what imapclient answers, or hand the reply back:
hypothesis replies of the plain shape and of others (FLAGS, quoted escapes, NIL, lowercase names,
odd dates, a literal followed by more items, a repeated UID) against imapclient's parser, and a
real Dovecot's replies through the client, with imapclient's parser never called."""

from __future__ import annotations

from typing import Any

import imapclient.response_parser
import pytest
from hypothesis import given, settings, strategies as st

from mailingestd.fetch import imap
from mailingestd.fetch.fetch_response import parse_plain

from test_imap_edge import dovecot_client, raw_message


def imapclient_reads(data: list[Any]) -> Any:
    try:
        return dict(imapclient.response_parser.parse_fetch_response(data, normalise_times=False, uid_is_key=True))
    except Exception as exc:  # noqa: BLE001 (the oracle's refusal is an answer too)
        return type(exc)


DATES = st.sampled_from([b'"05-Mar-2024 10:15:00 +0000"', b'" 5-Mar-2024 10:15:00 -0500"', b'"31-Feb-2024 10:15:00 +0100"',
                         b'"05-Mar-2024 10:15:00 -0000"', b'"05-Mar-0024 23:59:59 +0130"', b'"05-Mar-2024 24:00:00 +0000"',
                         b'"05-Mar-2024 10:15:00 +2400"', b'"05-mar-2024 10:15:00 +0000"', b'"5 Mar 2024 10:15 +0000"',
                         b"NIL", b'"junk"', b"7"])
NUMBERS = st.sampled_from([b"1", b"42", b"0", b"133000", b'"12"', b"NIL", b'"a\\"b"'])


@st.composite
def responses(draw: st.DrawFn) -> list[Any]:
    """Mostly the plain shape; in about one message of three, one thing that is not."""
    data: list[Any] = []
    for seq in range(1, draw(st.integers(min_value=0, max_value=4)) + 1):
        odd = draw(st.sampled_from(["none"] * 6 + ["missing", "number", "lowercase", "flags", "section", "after"]))
        items = []
        for name in draw(st.permutations([b"UID", b"RFC822.SIZE", b"INTERNALDATE"])):
            if odd == "missing" and draw(st.booleans()):
                continue  # an item left out
            value = draw(DATES) if name == b"INTERNALDATE" else (
                draw(NUMBERS) if odd == "number" else str(seq * 10).encode())
            items.append((b"uid" if name == b"UID" and odd == "lowercase" else name) + b" " + value)
        if odd == "flags":
            items.insert(draw(st.integers(0, len(items))), b"FLAGS (\\Seen)")
        body = draw(st.sampled_from([b"", b"Subject: x\r\n\r\nhi", b"{3}\r\n)"]))
        section = draw(st.sampled_from([b"BODY[HEADER]", None])) if odd == "section" else b"BODY[]"
        head = f"{seq} (".encode() + b" ".join(items)
        if section is None:
            data.append(head + b")")
        else:
            head += (b" " if items else b"") + section + f" {{{len(body)}}}".encode()
            data += [(head, body), b" FLAGS (\\Seen))" if odd == "after" else b")"]
    return data


@settings(max_examples=800, deadline=None)
@given(responses())
def test_a_reply_reads_as_imapclient_reads_it_or_goes_back_to_it(data):
    ours = parse_plain(data)
    if ours is not None:
        assert ours == imapclient_reads(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 10**9), st.integers(0, 10**7), st.binary(max_size=30)), max_size=5,
                unique_by=lambda t: t[0]))
def test_the_plain_shape_is_read_without_imapclient(messages):
    data: list[Any] = []
    for seq, (uid, size, body) in enumerate(messages, start=1):
        data += [(f'{seq} (UID {uid} RFC822.SIZE {size} INTERNALDATE "05-Mar-2024 10:15:00 +0100" '
                  f"BODY[] {{{len(body)}}}".encode(), body), b")"]
    ours = parse_plain(data)
    assert ours is not None and ours == imapclient_reads(data)
    assert [ours[uid][b"BODY[]"] for uid, _, _ in messages] == [body for _, _, body in messages]


def test_dovecot_replies_are_read_without_imapclients_parser(dovecot: Any, mailbox: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sent = [raw_message(1), raw_message(2, b"8-bit \xe9 and a ) and {5}\r\n")]
    for raw in sent:
        dovecot.append(mailbox, raw)
    client = dovecot_client(dovecot, mailbox)
    try:
        imap.examine(client, "INBOX")
        items = ["UID", "RFC822.SIZE", "INTERNALDATE", "BODY.PEEK[]"]
        expected = imapclient.IMAPClient.fetch(client, [1, 2, 99], items)  # imapclient's own reading
        calls = []
        original = imapclient.response_parser.parse_fetch_response
        monkeypatch.setattr(imapclient.response_parser, "parse_fetch_response",
                            lambda *args, **kwargs: calls.append(args) or original(*args, **kwargs))
        assert client.fetch([1, 2, 99], items) == expected and calls == []
        assert client.fetch([1, 2], ["RFC822.SIZE"]) == imapclient.IMAPClient.fetch(client, [1, 2], ["RFC822.SIZE"])
        assert client.fetch([2], ["FLAGS", "BODY.PEEK[HEADER]"]) == imapclient.IMAPClient.fetch(client, [2], ["FLAGS", "BODY.PEEK[HEADER]"])
        assert len(calls) == 1  # FLAGS: imapclient's
        fetched = imap.fetch_messages(client, [1, 2])
        assert [fetched[uid].raw for uid in (1, 2)] == sent
        assert fetched[1].internaldate == expected[1][b"INTERNALDATE"]
        assert fetched[1].internaldate.isoformat() == expected[1][b"INTERNALDATE"].isoformat()
    finally:
        imap.logout(client, 2)


def test_two_replies_for_one_uid_are_merged_by_imapclient():
    data = [b'1 (UID 7 RFC822.SIZE 5)', (b'2 (UID 7 INTERNALDATE NIL BODY[] {2}', b"hi"), b")"]
    assert parse_plain(data) is None
    assert imapclient_reads(data) == {7: {b"SEQ": 2, b"RFC822.SIZE": 5, b"INTERNALDATE": None, b"BODY[]": b"hi"}}
