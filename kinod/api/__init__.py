"""The HTTP API (SPEC §11): a client of the folder contract like any other.

It writes job and control files into the inbox, reads sidecars from the outbox
and heartbeats from the spool, and never reaches into a daemon's memory, so the
API of any node, or of ``kinod serve``, shows the whole farm.
"""
