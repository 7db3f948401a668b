"""The scheduler role: which account is polled or idles when, within every server's limits.
Everything here but scheduler.py is pure logic (no sockets, no store, no clock it does not get)."""
