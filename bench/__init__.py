"""End-to-end benchmarks of the real daemon against real local servers.

Run with ``./dev bench quick`` or ``./dev bench full`` (``python -m bench``); see bench/README.md.
Each scenario provisions what it needs (Dovecot, PostgreSQL, moto_server), runs ``mailingestd``
as a subprocess and measures from outside it: the store's rows, /proc, Dovecot's log and stats.
"""
