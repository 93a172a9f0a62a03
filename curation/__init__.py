"""curation: turn a raw image crawl into an LVD-style pretraining dataset."""

__version__ = "0.1.0"
