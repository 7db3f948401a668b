"""Sample mail for tests, benchmarks and the demo (standard library ``email`` only).

Every message is bytes with CRLF line endings, as IMAP APPEND expects and as a server hands the
message back, so a test can compare what was stored with what was appended byte for byte.

- :func:`corpus` is the edge-case set: the shapes that break header decoding or size accounting.
- :func:`make_large` builds one big message (a base64 binary attachment) for size-limit tests.
- :func:`random_message` builds realistic traffic for benchmarks, each with a unique Message-ID.
"""

from __future__ import annotations

import base64
import email.policy
import random
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Literal

__all__ = ["corpus", "make_large", "random_message"]

SizeMix = Literal["realistic", "small", "large"]

# SMTP policy: CRLF line ends and folding at 78 columns, which is what a real server stores.
_POLICY = email.policy.SMTP
_DOMAIN = "sample.mailingestd.test"
# base64 with CRLF every 76 characters turns 57 bytes into 78 on the wire.
_BASE64_RATIO_NUM, _BASE64_RATIO_DEN = 57, 78
_DATE = "Tue, 05 Mar 2024 10:15:00 +0000"


def _crlf(raw: bytes) -> bytes:
    """Normalise every line ending to CRLF (hand-written messages start with bare LF)."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _base(subject: str, sender: str = "Alice Example <alice@example.org>") -> EmailMessage:
    message = EmailMessage(policy=_POLICY)
    message["From"] = sender
    message["To"] = "Bob Example <bob@example.net>"
    message["Subject"] = subject
    message["Date"] = _DATE
    message["Message-ID"] = make_msgid(domain=_DOMAIN)
    return message


def _multipart_with_attachment() -> bytes:
    message = _base("Quarterly report (alternative + attachment)")
    message["Cc"] = "Carol <carol@example.com>, dave@example.com"
    message.set_content("Plain text part.\nSee the attached PDF.\n")
    message.add_alternative("<html><body><p>HTML part.</p></body></html>\n", subtype="html")
    message.add_attachment(
        bytes(range(256)) * 8, maintype="application", subtype="pdf", filename="report.pdf"
    )
    return message.as_bytes()


def _eight_bit_body() -> bytes:
    # Written by hand: EmailMessage would re-encode the body, and the point is raw 8-bit octets.
    return _crlf(
        (
            "From: Jörg <joerg@example.de>\n"
            "To: bob@example.net\n"
            "Subject: 8-bit body\n"
            f"Date: {_DATE}\n"
            f"Message-ID: {make_msgid(domain=_DOMAIN)}\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n"
            "Content-Transfer-Encoding: 8bit\n"
            "\n"
            "Grüße aus Köln — naïve café, 日本語のテキスト.\n"
        ).encode("utf-8")
    )


def _encoded_words() -> list[tuple[str, bytes]]:
    """RFC 2047 encoded-word headers in UTF-8 (base64) and ISO-8859-1 (quoted-printable)."""
    # The SMTP policy writes non-ASCII header text as UTF-8 encoded words.
    utf8 = _base("Résumé: 日本語 subject ✓", sender="Zoë Ünicode <zoe@example.org>")
    utf8.set_content("Encoded-word headers, UTF-8.\n")

    latin1 = _base("placeholder")
    del latin1["From"], latin1["Subject"]
    latin1["From"] = "=?ISO-8859-1?Q?Fran=E7ois_M=FCller?= <francois@example.fr>"
    latin1["Subject"] = "=?ISO-8859-1?Q?Cr=E8me_br=FBl=E9e_=E0_la_carte?="
    latin1.set_content("Encoded-word headers, ISO-8859-1.\n")
    return [("rfc2047_utf8", utf8.as_bytes()), ("rfc2047_latin1", latin1.as_bytes())]


def _no_message_id() -> bytes:
    message = _base("No Message-ID header")
    del message["Message-ID"]
    message.set_content("Consumers must cope without a Message-ID.\n")
    return message.as_bytes()


def _empty_body() -> bytes:
    message = _base("Empty body")
    return message.as_bytes()


def _reply() -> bytes:
    original, earlier = f"<original.1@{_DOMAIN}>", f"<earlier.0@{_DOMAIN}>"
    message = _base("Re: Quarterly report", sender="Bob Example <bob@example.net>")
    message.replace_header("To", "Alice Example <alice@example.org>")
    message["In-Reply-To"] = original
    message["References"] = f"{earlier} {original}"
    message.set_content("> Plain text part.\n\nThanks, looks good.\n")
    return message.as_bytes()


def corpus() -> list[tuple[str, bytes]]:
    """Edge-case messages as ``(name, raw)``; names are stable so tests can pick one."""
    return [
        ("multipart_alternative_attachment", _multipart_with_attachment()),
        ("eight_bit_body", _eight_bit_body()),
        *_encoded_words(),
        ("no_message_id", _no_message_id()),
        ("empty_body", _empty_body()),
        ("reply", _reply()),
    ]


def _with_attachment(subject: str, body_size: int, attachment_size: int, rng: random.Random) -> bytes:
    """A text message of about ``body_size`` bytes plus an optional random binary attachment.

    Written out by hand rather than through ``EmailMessage`` (which was the benchmarks' bottleneck
    at ~18 MB/s a core): the same MIME shape (text/plain, or multipart/mixed with a base64
    application/octet-stream part), CRLF line ends, base64 lines of 76 characters.
    """
    line = b"The quick brown fox jumps over the lazy dog. 0123456789\r\n"
    text = line * max(1, body_size // (len(line) - 1))
    headers = (
        f"From: Sender {rng.randrange(10_000)} <sender@example.org>\r\n"
        "To: Bob Example <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {_DATE}\r\n"
        f"Message-ID: <{rng.getrandbits(128):032x}@{_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    plain = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 7bit\r\n'
    if not attachment_size:
        return headers + plain + b"\r\n" + text
    boundary = f"=============={rng.getrandbits(64):016x}==".encode()
    encoded = base64.encodebytes(rng.randbytes(attachment_size)).replace(b"\n", b"\r\n")
    return b"".join([
        headers, b'Content-Type: multipart/mixed; boundary="', boundary, b'"\r\n\r\n',
        b"--", boundary, b"\r\n", plain, b"\r\n", text, b"\r\n",
        b"--", boundary, b"\r\n",
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="attachment.bin"\r\n\r\n',
        encoded, b"\r\n--", boundary, b"--\r\n",
    ])


def make_large(size_bytes: int, rng: random.Random | None = None) -> bytes:
    """One message of about ``size_bytes`` on the wire (within 1 %), carried mostly by a base64 attachment."""
    rng = rng or random.Random(size_bytes)
    attachment = max(0, (size_bytes - 2_000) * _BASE64_RATIO_NUM // _BASE64_RATIO_DEN)
    return _with_attachment(f"Large message ({size_bytes} bytes)", 1_000, attachment, rng)


def random_message(rng: random.Random, size_mix: SizeMix = "realistic") -> bytes:
    """A random message with a unique Message-ID, for benchmarks.

    ``realistic``: most between 2 and 50 KB, about 2 % of 1–10 MB (a binary attachment). ``small``: 2–50 KB
    only. ``large``: always 1–10 MB.
    """
    subject = f"Benchmark message {rng.getrandbits(32):08x}"
    large = size_mix == "large" or (size_mix == "realistic" and rng.random() < 0.02)
    if large:
        size = rng.randrange(1_000_000, 10_000_000)
        return _with_attachment(subject, 2_000, size * _BASE64_RATIO_NUM // _BASE64_RATIO_DEN, rng)
    return _with_attachment(subject, rng.randrange(2_000, 48_000), 0, rng)
