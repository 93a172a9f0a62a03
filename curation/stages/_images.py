"""What every stage that decodes pixels shares: the per-image decode limits and the drop row
for an image that cannot be decoded.

The limits are fields of each such stage's config so that one YAML entry can raise or lower
them; the defaults are ``curation.imaging``'s, which the trainer's loader uses too. Set them
alike on every stage of a pipeline: ``decode`` drops what exceeds them first, and a later stage
with lower limits would drop the same image again under its own name.
"""

from __future__ import annotations

import json

from pydantic import Field

from curation.imaging import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS, DecodeError
from curation.stage import StageConfig


class ImageStageConfig(StageConfig):
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb cap on width*height (decompression_bomb)")
    max_decoded_bytes: int = Field(
        DEFAULT_MAX_DECODED_BYTES,
        ge=1,
        description="cap on the memory one full decode needs, width*height*4 bytes (decoded_too_large); "
        "the default, 256 MiB, is below Pillow's bomb limit",
    )

    @property
    def decode_limits(self) -> dict[str, int]:
        """Keyword arguments for ``curation.imaging.decode_rgb``."""
        return {"max_pixels": self.max_pixels, "max_decoded_bytes": self.max_decoded_bytes}


def error_details(error: DecodeError, stage: str | None = None) -> str:
    """The ledger details of a row dropped because its image could not be decoded."""
    details = {"error": str(error)[:300]}
    if stage is not None:
        details["stage"] = stage
    return json.dumps(details)
