"""Bundled pipeline definitions (YAML). A package so that they ship inside the wheel and
``--config lvd`` resolves the same in a checkout, an editable install or a container."""

from pathlib import Path

DIR = Path(__file__).resolve().parent
