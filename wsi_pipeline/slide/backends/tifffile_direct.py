"""The direct-decode backend: for tiled TIFF-family slides (Aperio SVS, generic tiled TIFF, OME-TIFF) a region is
read by decoding only the stored tiles it touches (tifffile + imagecodecs: JPEG with shared tables, JPEG 2000,
deflate, LZW; YCbCr or RGB as stored), a large region's tiles in threads (imagecodecs releases the GIL), with a
small cache of decoded tiles so that neighbouring regions sharing a stored tile decode it once. It skips
OpenSlide's per-call overhead and its compositing step.

Layouts it does not know (NDPI, Philips, Leica SCN, Ventana: their levels or metadata need OpenSlide's rules) are
refused at open, and `auto` then uses OpenSlide, with one log line saying so.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import tifffile

from wsi_pipeline.core.errors import SlideTruncatedError, SlideUnreadableError
from wsi_pipeline.slide.integrity import check_tiff_complete, is_tiff
from wsi_pipeline.slide.reader import register_backend

if TYPE_CHECKING:
    from collections.abc import Mapping

LOG = logging.getLogger("wsi_pipeline.slide")
# JPEG, JPEG 2000 (Aperio YCbCr / RGB, generic), deflate, Adobe deflate, LZW, none
SUPPORTED_COMPRESSION = {1, 5, 7, 8, 32946, 33003, 33005, 34712}
SUPPORTED_PHOTOMETRIC = {2, 6}  # RGB, YCbCr
_NOT_HANDLED = ("is_ndpi", "is_philips", "is_scn", "is_bif", "is_qpi", "is_lsm", "is_stk")
CACHE_BYTES = 64 << 20  # decoded tiles kept per process
DECODE_THREADS = 4
# A region missing fewer stored tiles than this decodes them in the calling thread: the engine's tile reads (2-4
# stored tiles each) already run in parallel reading threads, and a pool hand-off per read cost 0.5-0.8 ms of CPU
# on a 2.0 ms read (96 px at 0.972 µm/px from 0.25). Thumbnails and large dense tiles still decode in parallel.
PARALLEL_DECODE_MIN = 8
_UNITS = {1: "none", 2: "inch", 3: "centimeter"}
# APP14 "Adobe", transform 0: the components are RGB, not YCbCr (how Aperio's "JPEG/RGB" tiles are stored)
ADOBE_RGB = bytes.fromhex("ffee000e") + b"Adobe" + bytes([0, 100, 0, 0, 0, 0, 0])
_OPEN_LOCK = threading.Lock()


def _new_open_lock() -> None:
    """A process forked while another thread held `_OPEN_LOCK` (a batch's preparing thread opening the next slide as
    the model's tile reader forks its worker processes) would inherit it held and wait for ever at its first read
    (CI: a `run` with engine.loader=processes hung). Its reading state is its own anyway (`_state`, per pid)."""
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_open_lock)


def _unsupported(path: Path, why: str) -> SlideUnreadableError:
    return SlideUnreadableError(f"{path}: the direct tifffile reader does not handle this file ({why})")


class TiffDirectReader:
    """`SlideReader` over the stored tiles of a tiled TIFF pyramid."""

    backend = "tifffile"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file() or not is_tiff(self.path):  # a DICOM series folder is OpenSlide's
            raise _unsupported(self.path, "not a TIFF file")
        self._local: dict[str, Any] = {}
        tif = self._tif
        flags = [name for name in _NOT_HANDLED if getattr(tif, name, False)]
        if flags:
            raise _unsupported(self.path, f"{flags[0][3:].upper()} layout")
        try:
            # a series' first page is its keyframe: a TiffPage (tifffile types it TiffPage | TiffFrame | None)
            pages = [cast(tifffile.TiffPage, level.pages[0]) for level in tif.series[0].levels]
        except (IndexError, ValueError, KeyError, AttributeError) as exc:  # no readable pyramid
            check_tiff_complete(self.path)
            raise _unsupported(self.path, f"no readable image series ({type(exc).__name__})") from exc
        for page in pages:
            if not page.is_tiled:
                raise _unsupported(self.path, "level stored in strips, not tiles")
            if page.compression not in SUPPORTED_COMPRESSION:
                raise _unsupported(self.path, f"compression {page.compression!s}")
            if page.photometric not in SUPPORTED_PHOTOMETRIC or page.samplesperpixel not in (3, 4):
                raise _unsupported(self.path, f"photometric {page.photometric!s} with {page.samplesperpixel} samples")
            if page.planarconfig != 1:
                raise _unsupported(self.path, "separate colour planes")
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in pages)
        w0, h0 = self.level_dimensions[0]
        # OpenSlide's rule: a level's downsample is the mean of its two axes' ratios
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
        self.properties: Mapping[str, str] = _properties(tif, pages[0])
        self._associated = {s.name.lower(): i for i, s in enumerate(tif.series[1:], 1) if s.name}
        self.associated_images = tuple(sorted(self._associated))

    # --- per-process state: file handle, tiles, thread pool, cache ---------------------------------------------
    @property
    def _tif(self) -> tifffile.TiffFile:
        return self._state()["tif"]

    def _state(self) -> dict[str, Any]:
        local = self._local
        if local.get("pid") != os.getpid():
            with _OPEN_LOCK:  # reading threads may all arrive first in a new process; one of them opens
                if local.get("pid") != os.getpid():
                    self._open_here()
        return local

    def _page(self, level: int) -> Any:
        """Level `level`'s first page; the pages are parsed once under the lock, since tifffile reads page headers
        lazily through one shared file position, which concurrent reading threads would move under each other."""
        local = self._state()
        if local["pages"] is None:
            with local["lock"]:
                if local["pages"] is None:
                    pages = [level.pages[0] for level in local["tif"].series[0].levels]
                    for page in pages:  # tag values tifffile may load on first use
                        page.dataoffsets, page.databytecounts, page.jpegtables, page.decode  # noqa: B018
                    local["pages"] = pages
        return local["pages"][level]

    def _open_here(self) -> None:
        """Open the file and this process's decoding state (the caller holds `_OPEN_LOCK`)."""
        local = self._local
        try:
            tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            check_tiff_complete(self.path)  # a truncated file is reported as such
            raise _unsupported(self.path, str(exc)) from exc
        local.clear()
        local.update(
            pid=os.getpid(),
            tif=tif,
            pages=None,
            fd=os.open(self.path, os.O_RDONLY),
            cache=OrderedDict(),
            cache_bytes=0,
            lock=threading.Lock(),
            pool=None,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_local"] = {}
        return state

    def close(self) -> None:
        local = self._local
        if local.get("pid") == os.getpid():
            if local["pool"] is not None:
                local["pool"].shutdown(wait=False)
            os.close(local["fd"])
            local["tif"].close()
        local.clear()

    # --- pixels ---------------------------------------------------------------------------------------------
    def read_level(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._page(level)
        out = np.full((height, width, 3), 255, np.uint8)
        tw, th = int(page.tilewidth), int(page.tilelength)
        iw, ih = self.level_dimensions[level]
        x0, y0, x1, y1 = max(0, x), max(0, y), min(iw, x + width), min(ih, y + height)
        if x0 >= x1 or y0 >= y1:
            return out
        across = (iw + tw - 1) // tw
        wanted = [(tx, ty) for ty in range(y0 // th, (y1 - 1) // th + 1) for tx in range(x0 // tw, (x1 - 1) // tw + 1)]
        tiles = self._tiles(page, level, [ty * across + tx for tx, ty in wanted], wanted)
        for (tx, ty), tile in zip(wanted, tiles, strict=True):
            # the tile's part inside both the image and the request
            ax0, ay0 = max(tx * tw, x0), max(ty * th, y0)
            ax1, ay1 = min((tx + 1) * tw, x1), min((ty + 1) * th, y1)
            out[ay0 - y : ay1 - y, ax0 - x : ax1 - x] = tile[
                ay0 - ty * th : ay1 - ty * th, ax0 - tx * tw : ax1 - tx * tw
            ]
        return out

    def _tiles(self, page: Any, level: int, indices: list[int], places: list[tuple[int, int]]) -> list[np.ndarray]:
        local = self._local
        cache: OrderedDict[tuple[int, int], np.ndarray] = local["cache"]
        with local["lock"]:
            found = {i: cache[(level, i)] for i in indices if (level, i) in cache}
            for i in found:
                cache.move_to_end((level, i))
        missing = [(i, place) for i, place in zip(indices, places, strict=True) if i not in found]
        if len(missing) >= PARALLEL_DECODE_MIN:
            with local["lock"]:
                if local["pool"] is None:
                    local["pool"] = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode")
            decoded = list(local["pool"].map(lambda item: self._decode(page, level, *item), missing))
        else:
            decoded = [self._decode(page, level, *item) for item in missing]
        with local["lock"]:
            for (i, _), tile in zip(missing, decoded, strict=True):
                found[i] = tile
                cache[(level, i)] = tile
                local["cache_bytes"] += tile.nbytes
            while local["cache_bytes"] > CACHE_BYTES and cache:
                local["cache_bytes"] -= cache.popitem(last=False)[1].nbytes
        return [found[i] for i in indices]

    def _decode(self, page: Any, level: int, index: int, place: tuple[int, int]) -> np.ndarray:
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        try:
            data = os.pread(self._local["fd"], count, offset)
            if len(data) != count or count == 0:
                raise ValueError(f"{len(data)} of {count} bytes present")
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # imagecodecs raises its own error types per codec
            raise SlideTruncatedError(
                f"{self.path}: stored tile ({place[0]}, {place[1]}) of level {level} (bytes {offset}-{offset + count}) "
                f"cannot be decoded ({type(exc).__name__}: {exc}); the file is damaged — copy it again from its source"
            ) from exc
        return np.ascontiguousarray(tile[0, :, :, :3])

    def stored_tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the tiles `level` is stored in."""
        page = self._page(level)
        return int(page.tilewidth), int(page.tilelength)

    def jpeg_streams(self, level: int, x: int, y: int, width: int, height: int) -> list[tuple[int, int, bytes]]:
        """The stored JPEG tiles a region of `level` touches, as (tile x, tile y, complete JPEG stream): the shared
        tables spliced in, and an Adobe marker where the tiles are stored as RGB, so that any JPEG decoder (nvJPEG
        through torchvision on a GPU) decodes them as tifffile does. Empty when the level is not JPEG."""
        page = self._page(level)
        if page.compression != 7:
            return []
        tw, th = int(page.tilewidth), int(page.tilelength)
        iw, ih = self.level_dimensions[level]
        across = (iw + tw - 1) // tw
        tables = page.jpegtables or b""
        header = (ADOBE_RGB if page.photometric == 2 else b"") + (tables[2:-2] if tables else b"")
        streams = []
        for ty in range(max(0, y) // th, (min(ih, y + height) - 1) // th + 1):
            for tx in range(max(0, x) // tw, (min(iw, x + width) - 1) // tw + 1):
                index = ty * across + tx
                data = os.pread(self._local["fd"], int(page.databytecounts[index]), int(page.dataoffsets[index]))
                streams.append((tx, ty, data[:2] + header + data[2:]))
        return streams

    def read_associated(self, name: str) -> np.ndarray:
        image = self._tif.series[self._associated[name]].asarray()
        return np.ascontiguousarray(image[..., :3]) if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def _properties(tif: tifffile.TiffFile, page: Any) -> dict[str, str]:
    """The OpenSlide property names the facade reads (vendor, µm/px, objective, resolution tags, comment)."""
    description = page.description or ""
    props: dict[str, str] = {"tiff.ImageDescription": description, "openslide.comment": description}
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    props["tiff.ResolutionUnit"] = _UNITS.get(int(unit.value) if unit is not None else 2, "inch")
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is not None:
            numerator, denominator = tag.value
            props[f"tiff.{name}"] = repr(numerator / denominator) if denominator else "0"
    if tif.is_svs:
        props["openslide.vendor"] = "aperio"
        meta = tifffile.tifffile.svs_description_metadata(description)
        if meta.get("MPP"):
            props["openslide.mpp-x"] = props["openslide.mpp-y"] = repr(float(meta["MPP"]))
        if meta.get("AppMag"):
            props["openslide.objective-power"] = repr(meta["AppMag"]).removesuffix(".0")
    else:
        props["openslide.vendor"] = "generic-tiff"
        # OpenSlide gives generic TIFF the µm/px of its resolution tags (in cm or inch)
        microns = {"centimeter": 1e4, "inch": 25400.0}.get(props["tiff.ResolutionUnit"])
        x, y = float(props.get("tiff.XResolution", 0)), float(props.get("tiff.YResolution", 0))
        if microns and x > 0 and y > 0:
            props["openslide.mpp-x"], props["openslide.mpp-y"] = repr(microns / x), repr(microns / y)
    return props


def _accepts(path: Path) -> bool:
    # NDPI, SCN and BIF have layouts this reader always refuses: `auto` sends them to OpenSlide without a word
    return path.suffix.lower() in (".svs", ".tif", ".tiff")


def _versions() -> dict[str, str]:
    import imagecodecs

    return {"tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__}


def _open(path: Path) -> TiffDirectReader:
    try:
        return TiffDirectReader(path)
    except SlideUnreadableError as exc:
        LOG.info("%s; reading it with OpenSlide", exc)
        raise


register_backend("tifffile", _open, accepts=_accepts, priority=10, versions=_versions)
