"""Development tools, not installed with the daemon (pyproject.toml packages only ``mailingestd``):
throwaway test servers on loopback (devservers: Dovecot, Cyrus, PostgreSQL, moto_server,
node_exporter, Prometheus), sample mail (samplemail) and the demo (``./dev demo``). The tests and
the benchmarks import them from the checkout."""
