"""The worker role: IMAP connections (IDLE, NOTIFY, polling), folder sync and the batch commit."""
