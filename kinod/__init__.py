"""kinod: a file-driven job daemon for render and generation farms."""

__version__ = "0.1.0"
