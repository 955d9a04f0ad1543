"""Product and intermediate FITS files: IMAGE, MASK and UNCERT (variance) extensions.

Layout: an empty primary HDU holding the header cards (provenance, dates, mask-plane cards), then
``IMAGE`` (float32, ``BUNIT`` when the writer knows the unit), ``MASK`` (int32 bit planes, ``MP_*``
cards; in the builds' intermediates one byte, or two, when every value fits) and ``UNCERT`` (float32, the variance,
``UTYPE = 'VarianceUncertainty'``) image extensions of the same shape. That is the layout astropy's
``CCDData.read(path)`` understands with no arguments (first HDU with data, ``MASK``, ``UNCERT``
with its ``UTYPE``); files written before the variance extension was called ``UNCERT``
(``VARIANCE``) are still read. Every card keeps its whole comment: a comment that cannot fit beside
its value goes to a ``COMMENT`` card instead of being cut.
Files are written to a temporary name in the destination folder and renamed into place
(``os.replace``), so a reader never sees a half-written product.

:class:`RowReader` opens a product once and reads row bands of its planes with ``os.pread`` into
caller-sized buffers. This is what the stacking engine uses: each input is opened once, nothing is
memory-mapped (mapped pages count against the resident set), and the bytes read per band are exactly
the rows asked for.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from astropy.io import fits

from calib_core.errors import InputError
from calib_core.io import env_megabytes, recycle
from calib_core.io.atomic import create_private
from calib_core.maskedimage import MASK_PLANES, MaskedImage
from calib_core.stats.warnfilters import filtered_warnings

__all__ = ["ProductError", "write_product", "write_hdulist", "read_product", "read_calib", "read_rows", "RowReader",
           "provenance_cards", "PLANES", "UNCERT_EXTNAME", "squared_unit"]

#: the planes of a product, by what they hold; the variance is stored in the ``UNCERT`` extension
PLANES = ("IMAGE", "MASK", "VARIANCE")
#: extension name of the variance plane (astropy CCDData's default ``hdu_uncertainty``); ``VARIANCE``
#: in files written before
UNCERT_EXTNAME = "UNCERT"
#: uncertainty classes an UNCERT extension may declare in ``UTYPE`` (astropy's names), and how a
#: stored value becomes a variance
_UTYPES = {"VarianceUncertainty": None, "StdDevUncertainty": "square"}

#: comments of the cards calibflow writes, for cards given without one (``n`` = any index)
CARD_COMMENTS = {
    "OBSTYPE": "product type", "CALIB_ID": "calib identity (key=value pairs)",
    "CALIB_INPUT_n": "input exposure id", "CALIB_INPUT_SCALE_n": "scale of input CALIB_INPUT_n",
    "CALIB_CREATION_DATE": "creation date (local)", "CALIB_CREATION_TIME": "creation time (local)",
    "TIMESYS": "time scale of the DATE-* keywords",
    "DATE-OBS": "start of the first input exposure", "DATE-AVG": "midpoint of the inputs' time span",
    "DATE-END": "end of the last input exposure", "NCOMBINE": "number of input exposures combined",
    "MJD-OBS": "DATE-OBS as MJD", "MJD-AVG": "DATE-AVG as MJD", "MJD-END": "DATE-END as MJD",
    "EXPTIME": "exposure time the product is scaled to (s)", "DARKTIME": "dark time the product is scaled to (s)",
    "CAMERA": "camera name", "DETECTOR": "detector id", "FILTER": "filter", "CALIBDATE": "calib date",
    "CFG_HASH": "hash of the build configuration", "CF_VERS": "calibflow version",
    "CCDSCALE": "flat scale of this CCD (mean of all CCDs is 1)", "CALIB_ISR_n": "calib applied in the inputs' ISR",
    "EXPID": "exposure id", "CALIB_ID_n": "calib id of detector n",
    "BUNIT": "unit of the pixel values", "UTYPE": "astropy uncertainty class",
    "LONGSTRN": "OGIP long-string convention (CONTINUE cards)",
}


class ProductError(InputError):
    """A product/intermediate file is missing, unreadable or malformed; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        super().__init__(f"{path}: {problem}")


def _fits_date(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds")


def _mjd(value: dt.datetime) -> float:
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return round((value - dt.datetime(1858, 11, 17)) / dt.timedelta(days=1), 8)


def provenance_cards(obstype: str, calib_id: Mapping[str, object] | str, inputs: Iterable[object],
                     dates: Iterable[dt.datetime] = (), exptimes: Iterable[float] | None = None,
                     exptime: float = 1.0, darktime: float | None = None,
                     now: dt.datetime | None = None) -> dict[str, object]:
    """Header cards recording how a calib was made (docs/algorithms.md#product-header).

    Parameters
    ----------
    obstype : str
        ``"bias"``, ``"dark"``, ``"flat"``, ...
    calib_id : mapping or str
        The output id; a mapping becomes space-separated ``key=value`` (dict order).
    inputs : iterable
        Input exposure ids; ``CALIB_INPUT_<i>`` is written for each unique id, sorted as strings.
    dates : iterable of datetime
        Start times (UTC) of the inputs.
    exptimes : iterable of float, optional
        Exposure times of the inputs (s), same order as ``dates``; DATE-END uses the latest
        start + its exposure time (0 when not given).
    exptime : float, default 1.0
        EXPTIME of the product (0.0 for a bias, 1.0 for a dark, as the reference).
    darktime : float, optional
        DARKTIME of the product (defaults to ``exptime``).
    now : datetime, optional
        Creation time (default: now, local time as the reference).

    Returns
    -------
    dict
        Card name -> value, in write order.
    """
    cards: dict[str, object] = {"OBSTYPE": obstype}
    if isinstance(calib_id, Mapping):
        calib_id = " ".join(f"{k}={v}" for k, v in calib_id.items())
    cards["CALIB_ID"] = str(calib_id)
    inputs = list(inputs)
    for i, key in enumerate(sorted({str(x) for x in inputs})):
        cards[f"CALIB_INPUT_{i}"] = key
    local = (now or dt.datetime.now()).astimezone()
    cards["CALIB_CREATION_DATE"] = local.strftime("%Y-%m-%d")
    cards["CALIB_CREATION_TIME"] = local.strftime("%X %Z")
    dates = list(dates)
    if dates:
        exps = list(exptimes) if exptimes is not None else [0.0] * len(dates)
        if len(exps) != len(dates):
            raise ValueError(f"{len(exps)} exposure times for {len(dates)} dates")
        begin = min(dates)
        end = max(d + dt.timedelta(seconds=float(e)) for d, e in zip(dates, exps))
        cards["TIMESYS"] = "UTC"
        cards["DATE-OBS"] = _fits_date(begin)
        cards["DATE-AVG"] = _fits_date(begin + (end - begin) / 2)
        cards["DATE-END"] = _fits_date(end)
        # the same instants as MJD: astropy's WCS reader otherwise derives them, with a warning
        cards["MJD-OBS"] = _mjd(begin)
        cards["MJD-AVG"] = _mjd(begin + (end - begin) / 2)
        cards["MJD-END"] = _mjd(end)
    cards["NCOMBINE"] = len(inputs)
    cards["EXPTIME"] = float(exptime)
    cards["DARKTIME"] = float(exptime if darktime is None else darktime)
    return cards


def _default_comment(key: str) -> str | None:
    """calibflow's comment of a card (``KEY_3`` and the family name ``KEY_n`` find ``KEY_n``)."""
    key = key.removeprefix("HIERARCH ").upper()
    if key.startswith("MP_"):
        return f"bit number of mask plane {key[3:]}"
    return CARD_COMMENTS.get(key) or CARD_COMMENTS.get(re.sub(r"_(\d+|N)$", "_n", key))


def _comment_fits(key: str, value, comment: str) -> bool:
    """Whether astropy writes ``comment`` whole on the card (it cuts a comment that does not fit
    beside a one-card value; a value continued with CONTINUE cards keeps it on the last one)."""
    with filtered_warnings(("always", Warning), record=True) as caught:
        str(fits.Card(key, value, comment))
    return not any("comment will be truncated" in str(w.message) for w in caught)


def _header_with(cards: Mapping[str, object] | fits.Header | None) -> fits.Header:
    """Cards (``value`` or ``(value, comment)``) as a header: long names become HIERARCH cards, cards
    given without a comment get calibflow's (:data:`CARD_COMMENTS`), and a comment that does not fit
    beside its value is written once per key family as ``COMMENT KEY: text`` after the card instead of
    being cut. ``LONGSTRN`` is declared when a value needs CONTINUE cards."""
    header = fits.Header()
    explained: set[tuple[str, str]] = set()
    long_strings = False
    for key, value in (cards or {}).items():
        if isinstance(value, tuple):
            value, comment = value
        else:
            comment = _default_comment(key)
        if len(key) > 8 and not key.startswith("HIERARCH "):
            key = "HIERARCH " + key
        if comment and not _comment_fits(key, value, comment):
            header.set(key, value)
            family = re.sub(r"\d+$", "n", key.removeprefix("HIERARCH "))
            text = _default_comment(family) or comment      # one line for CALIB_ISR_0, _1, ...
            if (family, text) not in explained:
                explained.add((family, text))
                header.append(("COMMENT", f"{family}: {text}"), bottom=True)
        else:
            header.set(key, value, comment)
        long_strings |= isinstance(value, str) and len(str(fits.Card(key, value))) > 80
    if long_strings and "LONGSTRN" not in header:
        header.insert(0, ("LONGSTRN", "OGIP 1.0", CARD_COMMENTS["LONGSTRN"]))
    return header


def squared_unit(unit: str) -> str:
    """The FITS unit string of a variance, for a data unit string (``adu`` -> ``adu2``)."""
    import astropy.units as u

    try:
        return (u.Unit(unit) ** 2).to_string("fits") or unit
    except ValueError:          # a unit the FITS standard lacks (electron/adu): astropy's generic form
        return (u.Unit(unit) ** 2).to_string()


def write_product(path, masked_image: MaskedImage, header_cards=None, unit: str | None = None,
                  image_cards=None, extra_hdus=(), compact_mask: bool = False, variance: bool = True) -> Path:
    """Write a masked image as an IMAGE/MASK/UNCERT FITS file, atomically.

    Parameters
    ----------
    path : str or Path
        Destination; its folder must exist.
    masked_image : MaskedImage
        Planes of shape (ny, nx); written as float32/int32/float32 (the variance in ``UNCERT``,
        declared ``UTYPE = 'VarianceUncertainty'``).
    header_cards : mapping, optional
        Cards for the primary header (``value`` or ``(value, comment)``); long names become
        HIERARCH cards. The mask-plane cards (``MP_*``) are added to the primary and MASK headers.
    unit : str, optional
        FITS unit string of the image (``adu``, ``adu/s``, ``1`` for dimensionless): ``BUNIT`` of
        IMAGE, and its square that of UNCERT. Without it no ``BUNIT`` is written.
    image_cards : mapping, optional
        Cards for the header of each extension (IMAGE, MASK, UNCERT): a WCS, say, so that any of
        them opened alone is placed.
    extra_hdus : sequence of HDUs, optional
        Appended after UNCERT (a PTC product's tables).
    compact_mask : bool, default False
        Write MASK in one byte (FITS BITPIX 8, unsigned) when every value fits (the planes the
        builds set: bits 0-7), else int16 when they fit there: 9 or 10 bytes a pixel instead of 12.
        The build's intermediates are written so; readers widen it to int32.
    variance : bool, default True
        Write the UNCERT extension. Intermediates whose variance no later step reads (the defects,
        PTC and sky builds': ``calib_core.builds.calibtypes.Processed.variance``) leave it out, 4 of
        their ~9 bytes a pixel; readers then see no variance plane (:func:`read_product` gives
        zeros, :attr:`RowReader.has_variance` is False).

    Returns
    -------
    Path
        The destination path.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ProductError(path, "destination folder does not exist")
    primary = fits.PrimaryHDU(header=_header_with(header_cards))
    plane_cards = _header_with(MASK_PLANES.to_header())
    primary.header.extend(plane_cards, update=True)
    # the planes in FITS byte order (big-endian) already: astropy then writes them as they are, where it
    # would byteswap a native array in place and back (two passes over each plane instead of one)
    image = fits.ImageHDU(_fits_order(masked_image.image, np.float32), name="IMAGE")
    mask_plane = np.asarray(masked_image.mask)
    mask_dtype = np.int32
    if compact_mask and mask_plane.size and int(mask_plane.min()) >= 0:
        top = int(mask_plane.max())
        mask_dtype = np.uint8 if top < 2**8 else np.int16 if top < 2**15 else np.int32
    mask = fits.ImageHDU(_fits_order(mask_plane, mask_dtype), name="MASK")
    planes = [image, mask] + ([variance_hdu(masked_image.variance, unit)] if variance else [])
    if unit is not None:
        image.header["BUNIT"] = (unit, _default_comment("BUNIT"))
    mask.header.extend(plane_cards, update=True)
    if image_cards:
        for hdu in planes:
            hdu.header.extend(_header_with(image_cards), update=True)
    return write_hdulist(path, fits.HDUList([primary, *planes, *extra_hdus]))


def _fits_order(plane: np.ndarray, dtype) -> np.ndarray:
    """``plane`` as a C-contiguous array of ``dtype`` in FITS (big-endian) byte order: one pass."""
    return np.ascontiguousarray(plane, dtype=np.dtype(dtype).newbyteorder(">"))


def variance_hdu(variance: np.ndarray, unit: str | None = None) -> fits.ImageHDU:
    """The ``UNCERT`` extension of a variance plane (float32), as astropy's CCDData reads it."""
    hdu = fits.ImageHDU(_fits_order(variance, np.float32), name=UNCERT_EXTNAME)
    hdu.header["UTYPE"] = ("VarianceUncertainty", "the values are variances (astropy class)")
    if unit is not None:
        hdu.header["BUNIT"] = (squared_unit(unit), "unit of the variance")
    return hdu


def write_hdulist(path, hdulist: fits.HDUList, header_cards=None) -> Path:
    """Write any FITS HDU list atomically (temporary name in the same folder, then rename), with
    optional extra cards in the primary header (as :func:`write_product`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ProductError(path, "destination folder does not exist")
    if header_cards:
        hdulist[0].header.extend(_header_with(header_cards), update=True)
    # over a retired intermediate's cached pages where a pool is open (calib_core.io.recycle), else a
    # fresh file; either way named after this host and process, so that a killed writer's leftover is swept
    tmp = recycle.claim(path, _data_bytes(hdulist)) if recycle.active() else None
    try:
        if tmp is None:
            tmp = create_private(path)
            hdulist.writeto(tmp, overwrite=True)
        else:
            with open(tmp, "r+b") as f:
                hdulist.writeto(_Overwrite(f))
                f.truncate()
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _data_bytes(hdulist: fits.HDUList) -> int:
    """About the size the file will have: its data arrays' bytes (headers, a few kB, left out)."""
    return sum(int(getattr(hdu.data, "nbytes", 0) or 0) for hdu in hdulist if hdu.data is not None)


class _Overwrite:
    """A file opened ``r+b``, seen by astropy as a plain output stream: astropy would read an existing
    file it is given in update mode, or delete it to overwrite it."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        return self._f.write(data)

    def tell(self):
        return self._f.tell()

    def seek(self, *args):
        return self._f.seek(*args)

    def flush(self):
        self._f.flush()


def read_product(path) -> tuple[MaskedImage, fits.Header]:
    """Read a product written by :func:`write_product`.

    Returns
    -------
    (MaskedImage, astropy.io.fits.Header)
        The planes (native byte order) and the primary header. A file with only an image (primary
        or IMAGE HDU) is accepted: its mask is 0 and its variance 0.
    """
    with RowReader(path) as reader:
        image, mask, variance = reader.rows(0, reader.shape[0])
        header = reader.header
    if mask is None:
        mask = np.zeros(image.shape, np.int32)
    if variance is None:
        variance = np.zeros(image.shape, np.float32)
    return MaskedImage(image, mask, variance), header


#: environment variable: megabytes of calib products a process keeps read (0: none)
CALIB_CACHE_ENV = "CALIBFLOW_CALIB_CACHE_MB"
#: its default: the calibs a democam night's ISR applies to all nine CCDs (bias, dark, flat,
#: fringe, defects at 24 MB each), so each is read once per build instead of once per exposure
CALIB_CACHE_MB = 1536


def content_key(path) -> tuple:
    """What names a product file's content: its path with the file's device, inode, size and
    modification time. Products are written once, to a temporary name then renamed, so a product
    replaced on disk gets a new key (the caches of :func:`read_calib` and
    :func:`calib_core.builds.ptc.read_ptc`). Raises OSError when the file cannot be stat'ed."""
    st = os.stat(path)
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class _CalibCache:
    """Calib products already read, least recently used first, up to a byte budget. A product is
    written once (to a temporary name, then renamed), so its path with the file's inode, size and
    modification time names its content: a product replaced on disk is read again."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, MaskedImage] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def budget() -> int:
        return env_megabytes(CALIB_CACHE_ENV, CALIB_CACHE_MB)

    def get(self, path) -> MaskedImage:
        try:
            key = content_key(path)
        except OSError as exc:
            raise ProductError(path, f"cannot read ({exc.strerror or exc})") from None
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        mi = read_product(path)[0]
        for plane in (mi.image, mi.mask, mi.variance):
            plane.flags.writeable = False          # shared by every caller: nobody may change it
        size = _nbytes(mi)
        budget = self.budget()
        with self._lock:
            if size <= budget and key not in self._items:
                self._items[key] = mi
                self._bytes += size
                while self._bytes > budget:
                    self._bytes -= _nbytes(self._items.popitem(last=False)[1])
        return mi

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _nbytes(mi: MaskedImage) -> int:
    return mi.image.nbytes + mi.mask.nbytes + mi.variance.nbytes


_CALIBS = _CalibCache()


def read_calib(path) -> MaskedImage:
    """A calib product's planes, read once per process while they fit the cache
    (``CALIBFLOW_CALIB_CACHE_MB``, default 1536): the ISR of every exposure applies the same few
    masters (docs/architecture.md#reading-the-calibs-a-build-applies). The planes are shared and
    read-only; copy before changing them."""
    return _CALIBS.get(path)


def read_rows(path, y0: int, y1: int):
    """Rows ``y0:y1`` of the IMAGE, MASK and VARIANCE planes of a product (None for absent planes).

    Opens and closes the file; to read many bands, keep a :class:`RowReader` open instead.
    """
    with RowReader(path) as reader:
        return reader.rows(y0, y1)


class RowReader:
    """Read row bands of a product's planes without re-reading the file.

    Parameters
    ----------
    path : str or Path
        An uncompressed FITS file with an ``IMAGE`` extension (or image data in the primary HDU),
        and optionally ``MASK`` (int32) and a float32 variance of the same shape: ``UNCERT``
        declaring ``UTYPE`` ``VarianceUncertainty`` (or ``StdDevUncertainty``, squared on reading;
        astropy reads an UNCERT without UTYPE as a standard deviation, and so does this), or
        ``VARIANCE`` (files written before).

    Attributes
    ----------
    shape : (ny, nx)
    header : astropy.io.fits.Header
        The primary header.
    has_mask, has_variance : bool
    """

    _DTYPES = {"IMAGE": (-32,), "MASK": (32, 16, 8), "VARIANCE": (-32,)}

    def __init__(self, path):
        self.path = str(path)
        self._fd = None
        self._loc: dict[str, int] = {}
        self._itemsize: dict[str, int] = {}
        try:
            with fits.open(self.path, memmap=False, lazy_load_hdus=True) as hdul:
                self.header = hdul[0].header.copy()
                names = {}
                for i, hdu in enumerate(hdul):
                    name = str(hdu.header.get("EXTNAME", "PRIMARY" if i == 0 else "")).upper()
                    names[name] = i
                if "IMAGE" not in names and hdul[0].header.get("NAXIS", 0) == 2:
                    names["IMAGE"] = 0
                if "IMAGE" not in names:
                    raise ProductError(self.path, "no IMAGE extension and no 2-D primary image")
                self._variance_from = None
                if UNCERT_EXTNAME in names:
                    names["VARIANCE"] = names[UNCERT_EXTNAME]
                    utype = str(hdul[names["VARIANCE"]].header.get("UTYPE", "StdDevUncertainty"))
                    if utype not in _UTYPES:
                        raise ProductError(self.path, f"{UNCERT_EXTNAME} holds a {utype}; readable: "
                                                      f"{', '.join(_UTYPES)}")
                    self._variance_from = _UTYPES[utype]
                shape = None
                for plane in PLANES:
                    if plane not in names:
                        continue
                    idx = names[plane]
                    hdr = hdul[idx].header
                    if hdr.get("ZIMAGE") or isinstance(hdul[idx], fits.CompImageHDU):
                        raise ProductError(self.path, f"{plane} is tile-compressed; products must be plain")
                    if hdr.get("NAXIS") != 2:
                        raise ProductError(self.path, f"{plane} is not a 2-D image (NAXIS={hdr.get('NAXIS')})")
                    if hdr.get("BITPIX") not in self._DTYPES[plane]:
                        raise ProductError(self.path, f"{plane} has BITPIX={hdr.get('BITPIX')}, expected "
                                                      + " or ".join(map(str, self._DTYPES[plane])))
                    self._itemsize[plane] = abs(int(hdr["BITPIX"])) // 8
                    if hdr.get("BZERO", 0) != 0 or hdr.get("BSCALE", 1) != 1:
                        raise ProductError(self.path, f"{plane} is scaled (BZERO/BSCALE); not supported")
                    this = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
                    if shape is not None and this != shape:
                        raise ProductError(self.path, f"{plane} shape {this} differs from IMAGE {shape}")
                    shape = this
                    self._loc[plane] = int(hdul.fileinfo(idx)["datLoc"])
            self.shape = shape
        except ProductError:
            raise
        except FileNotFoundError:
            raise ProductError(self.path, "file not found") from None
        except Exception as exc:  # astropy raises many types for corrupt files
            raise ProductError(self.path, f"cannot read FITS structure ({type(exc).__name__}: {exc})") from None
        if self.path.endswith((".gz", ".fz", ".bz2")):
            raise ProductError(self.path, "compressed files cannot be read by row band")
        self._fd = os.open(self.path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        ny, nx = self.shape
        for plane, loc in self._loc.items():
            if loc + ny * nx * self._itemsize[plane] > self._size:
                raise ProductError(self.path, f"{plane} data truncated (file is {self._size} bytes)")

    @property
    def has_mask(self) -> bool:
        return "MASK" in self._loc

    @property
    def has_variance(self) -> bool:
        return "VARIANCE" in self._loc

    def read_into(self, plane: str, y0: int, y1: int, out: np.ndarray) -> np.ndarray:
        """Read rows ``y0:y1`` of ``plane`` into ``out`` (4-byte dtype, C-contiguous, (y1-y0)*nx
        elements), converting from big-endian in place (a one- or two-byte MASK is widened). Returns ``out``."""
        ny, nx = self.shape
        if not (0 <= y0 <= y1 <= ny):
            raise ProductError(self.path, f"row band {y0}:{y1} outside 0:{ny}")
        size = self._itemsize[plane]
        flat = out.reshape(-1)[: (y1 - y0) * nx]
        narrow = {1: np.uint8, 2: ">i2"}.get(size)
        into = np.empty(flat.size, narrow) if narrow else flat       # a narrow MASK: read, then widen
        nbytes = flat.size * size
        got = os.preadv(self._fd, [memoryview(into.view(np.uint8))], self._loc[plane] + y0 * nx * size)
        if got != nbytes:
            raise ProductError(self.path, f"short read of {plane} rows {y0}:{y1} ({got} of {nbytes} bytes)")
        if narrow:
            flat[:] = into
            return out
        _to_native(flat)
        if plane == "VARIANCE" and self._variance_from == "square":
            np.square(flat, out=flat)
        return out

    def rows(self, y0: int, y1: int):
        """(image, mask or None, variance or None) for rows ``y0:y1``, native byte order."""
        nx = self.shape[1]
        image = self.read_into("IMAGE", y0, y1, np.empty((y1 - y0, nx), np.float32))
        mask = (self.read_into("MASK", y0, y1, np.empty((y1 - y0, nx), np.int32))
                if self.has_mask else None)
        variance = (self.read_into("VARIANCE", y0, y1, np.empty((y1 - y0, nx), np.float32))
                    if self.has_variance else None)
        return image, mask, variance

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _to_native(flat: np.ndarray) -> None:
    """Byte-swap big-endian 4-byte words in place (FITS is big-endian)."""
    if np.little_endian:
        from calib_core.stats._kernels import bswap32_inplace

        bswap32_inplace(flat.view(np.uint32))
