"""The ready-to-run Socket.IO gateway service built on :mod:`nats_adapter`."""
