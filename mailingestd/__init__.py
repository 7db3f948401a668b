"""mailingestd: ingest new mail from many IMAP mailboxes into a durable store and announce it."""

__version__ = "0.1.0"
