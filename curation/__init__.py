"""curation: turn a raw image crawl into an LVD-style pretraining dataset."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``curation.open_run`` without importing torch and Ray for ``import curation``."""
    if name == "open_run":
        from curation.reader import open_run

        return open_run
    raise AttributeError(f"module 'curation' has no attribute {name!r}")
