"""Batch JPEG decoding on the GPU for the model stages (nvJPEG through torchvision).

On a GPU, Pillow decoding on the host is what a ViT smaller than ViT-L waits for. Here a batch
of encoded images goes to ``torchvision.io.decode_jpeg(list, device="cuda")`` in one call and
the embedder's own preprocessing (resize, crop, normalise) runs on the decoded tensors, on the
GPU, on a stream of its own so that it overlaps the model's forward pass.

Per image, the host decides from the header alone (``curation.imaging.probe``: the same limits
and drop reasons as a CPU decode) whether nvJPEG gets it: single-frame JPEGs in RGB or grey do;
everything else (CMYK, PNG, WebP, ...) takes the CPU path. nvJPEG decodes a batch all or
nothing, so a rejected batch is decoded image by image and whatever nvJPEG still rejects takes
the CPU path too, which then decodes it or names the reason it cannot. A decoded image whose
last block is flat grey (what a cut-short JPEG decodes to) is handed to the CPU path as well,
which tells a cut file from a grey picture. EXIF orientation is applied to the tensor.

The same code runs with ``device="cpu"`` (torchvision's libjpeg decoder), which is how the
tests exercise the selection and batching on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from curation.imaging import DecodeError, probe

# torchvision >= 0.29 warns that its decoders move to TorchCodec; they are what runs here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision", category=UserWarning)

DEVICE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB like Pillow does; CMYK goes to the CPU


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (as PIL's ``exif_transpose``) to a CHW tensor."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-2, -1)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return x.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def filled_tails(images: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each decoded image ends in flat grey (libjpeg/nvJPEG's fill for missing data);
    one host sync for the whole batch."""
    if not images:
        return []
    tails = torch.stack([((x[:, -8:, -8:] == 128) | (x[:, -8:, -8:] == 127)).flatten().all() for x in images])
    return tails.tolist()


@dataclass
class Prepared:
    """Model inputs for one batch (tensors on the device, or the DecodeError of a dropped row),
    ready once ``wait`` has made the consumer's stream wait for the decode stream."""

    items: list
    event: torch.cuda.Event | None = None
    counts: Counter = field(default_factory=Counter)

    def wait(self) -> list:
        if self.event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.event)
            for x in self.items:
                if isinstance(x, torch.Tensor):
                    x.record_stream(stream)  # freed after the consumer is done with it
        return self.items


class BatchJpegDecoder:
    """Decodes batches of encoded images to an embedder's model inputs on ``device``.

    ``cpu_prepare(bytes) -> tensor | DecodeError`` is the CPU path (the stage's own decode and
    ``preprocess``); ``cpu_pool`` runs it for the images that take it.
    """

    def __init__(
        self,
        preprocess: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device,
        cpu_prepare: Callable[[bytes], object],
        limits: dict[str, int] | None = None,
        cpu_pool: Executor | None = None,
        decoder: Callable = decode_jpeg,
    ):
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.cpu_prepare = cpu_prepare
        self.limits = dict(limits or {})
        self.cpu_pool = cpu_pool
        self.decoder = decoder
        self.counts: Counter = Counter()  # images per path, over the decoder's life
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def prepare(self, blobs: Sequence[bytes | None]) -> Prepared:
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            items, counts = self._prepare(blobs)
            event = None
            if self.stream is not None:
                event = torch.cuda.Event()
                event.record(self.stream)
        self.counts.update(counts)
        return Prepared(items, event, counts)

    def _prepare(self, blobs: Sequence[bytes | None]) -> tuple[list, Counter]:
        counts: Counter = Counter()
        items: list = [None] * len(blobs)
        on_device: list[tuple[int, int]] = []  # (row, EXIF orientation)
        on_host: list[int] = []
        for i, data in enumerate(blobs):
            try:
                info = probe(data or b"", **self.limits)
            except DecodeError as e:
                items[i] = e
                counts["dropped"] += 1
                continue
            if info.format == "JPEG" and info.mode in DEVICE_MODES and info.n_frames == 1:
                on_device.append((i, info.orientation))
            else:
                on_host.append(i)
                counts["cpu_format"] += 1
        on_cpu = self._submit_cpu(blobs, on_host)  # host decoding overlaps the device's
        decoded = self._decode([blobs[i] for i, _ in on_device])
        present = [x for x in decoded if x is not None]
        grey_tail = iter(filled_tails(present))
        late: list[int] = []
        for (i, orientation), x in zip(on_device, decoded):
            if x is None:
                counts["cpu_rejected"] += 1
                late.append(i)
            elif next(grey_tail):
                counts["cpu_grey_tail"] += 1
                late.append(i)
            else:
                items[i] = self.preprocess(orient(x, orientation))
                counts["device"] += 1
        on_cpu.update(self._submit_cpu(blobs, late))
        for i, result in on_cpu.items():
            items[i] = self._to_device(result())
            if isinstance(items[i], DecodeError):
                counts["dropped"] += 1
        return items, counts

    def _submit_cpu(self, blobs, rows: list[int]) -> dict[int, Callable[[], object]]:
        """Row -> a call that returns its CPU-path result (run in ``cpu_pool`` when there is one)."""
        if self.cpu_pool is None:
            return {i: functools.partial(self.cpu_prepare, blobs[i]) for i in rows}
        return {i: self.cpu_pool.submit(self.cpu_prepare, blobs[i]).result for i in rows}

    def _to_device(self, result):
        if isinstance(result, torch.Tensor):
            return result.to(self.device, non_blocking=True)
        return result

    def _decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """nvJPEG on the whole batch; image by image when it rejects the batch."""
        if not blobs:
            return []
        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self.decoder(encoded, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError):
            pass
        out: list[torch.Tensor | None] = []
        for x in encoded:
            try:
                out.append(self.decoder(x, mode=ImageReadMode.RGB, device=self.device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out
