"""The supervisor: forks the roles, pins them to cores, restarts them, answers the control socket,
writes the metrics file and talks to systemd. Imports the roles only to start them."""
