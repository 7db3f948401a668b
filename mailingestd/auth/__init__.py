"""Credentials: passwords and OAuth2 tokens, secrets sealed in the store, `account authorize`.
Used by the workers, the supervisor and mailingestctl; imports nothing of the roles."""
