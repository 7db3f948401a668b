"""The publisher role: the outbox to SQS, in order per account, each row sent once per node claim."""
