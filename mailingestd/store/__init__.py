"""The durable store and the only place that writes SQL: SQLite or PostgreSQL behind one Store,
migrations, message keys, partitions, retention, raw bodies in S3 and the cluster's leases."""
