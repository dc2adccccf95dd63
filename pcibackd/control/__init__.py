"""pcibackctl and the daemon's control socket (see protocol.py, server.py, commands/)."""
