"""Masked images: a float32 image, a mask of named bit planes and a float32 variance.

Arithmetic follows the reference (docs/algorithms.md#masked-images, afw MaskedImage):

* ``mi /= s``  -> image / s, variance / s**2
* ``mi *= s``  -> image * s, variance * s**2
* ``mi -= other`` (a MaskedImage) -> image - other.image, variance + other.variance, mask | other.mask
* ``mi -= array`` (a plain image) -> only the image plane changes
* ``mi.scaled_minus(c, other)`` -> image - c*other.image, variance + c**2 * other.variance, mask |= other.mask
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MaskPlanes", "MASK_PLANES", "MaskedImage", "mask_bits"]


class MaskPlanes:
    """A registry of named mask bit planes, extensible at run time.

    >>> planes = MaskPlanes()
    >>> planes.bit("SAT")
    2
    >>> planes.add("CROSSTALK")  # a new plane gets the next free bit
    1024
    """

    DEFAULT = ("BAD", "SAT", "INTRP", "CR", "EDGE", "DETECTED", "DETECTED_NEGATIVE", "NO_DATA", "SUSPECT")

    def __init__(self, names=DEFAULT):
        self._bits: dict[str, int] = {}
        for name in names:
            self.add(name)

    def add(self, name: str) -> int:
        """Add a plane (idempotent) and return its bit value."""
        name = name.upper()
        if name not in self._bits:
            if len(self._bits) >= 31:
                raise ValueError("at most 31 mask planes fit in an int32 mask")
            self._bits[name] = 1 << len(self._bits)
        return self._bits[name]

    def bit(self, name: str) -> int:
        try:
            return self._bits[name.upper()]
        except KeyError:
            raise KeyError(f"unknown mask plane {name!r}; known: {', '.join(self._bits)}") from None

    def bits(self, names) -> int:
        """OR of the bits of several planes (unknown names are an error)."""
        value = 0
        for n in names or ():
            value |= self.bit(n)
        return value

    def names(self, value: int) -> list[str]:
        return [n for n, b in self._bits.items() if value & b]

    def items(self):
        return self._bits.items()

    def to_header(self) -> dict[str, int]:
        """FITS cards describing the planes (``MP_<NAME> = bit index``), as afw writes them."""
        return {f"MP_{n}"[:8] if len(n) <= 5 else f"HIERARCH MP_{n}": int(b).bit_length() - 1
                for n, b in self._bits.items()}


MASK_PLANES = MaskPlanes()


def mask_bits(names) -> int:
    """Bits of the named planes in the default registry."""
    return MASK_PLANES.bits(names)


@dataclass
class MaskedImage:
    """Image, mask and variance planes of the same shape (ny, nx)."""

    image: np.ndarray
    mask: np.ndarray
    variance: np.ndarray

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        self.variance = np.asarray(self.variance, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=np.int32)
        if not (self.image.shape == self.mask.shape == self.variance.shape):
            raise ValueError(f"planes differ in shape: image {self.image.shape}, mask {self.mask.shape}, "
                             f"variance {self.variance.shape}")

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "MaskedImage":
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.int32), np.zeros(shape, np.float32))

    @classmethod
    def from_image(cls, image: np.ndarray, variance: np.ndarray | None = None) -> "MaskedImage":
        image = np.asarray(image, dtype=np.float32)
        return cls(image, np.zeros(image.shape, np.int32),
                   np.zeros(image.shape, np.float32) if variance is None else variance)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    def copy(self) -> "MaskedImage":
        return MaskedImage(self.image.copy(), self.mask.copy(), self.variance.copy())

    def __getitem__(self, key) -> "MaskedImage":
        """A view of a sub-region (numpy slicing on all three planes)."""
        return MaskedImage.__new_view(self.image[key], self.mask[key], self.variance[key])

    @staticmethod
    def __new_view(image, mask, variance) -> "MaskedImage":
        obj = object.__new__(MaskedImage)
        obj.image, obj.mask, obj.variance = image, mask, variance
        return obj

    # -- arithmetic (afw semantics) ------------------------------------------------------------------

    def __itruediv__(self, scale: float) -> "MaskedImage":
        scale = float(scale)
        self.image /= np.float32(scale)
        self.variance /= np.float32(scale * scale)
        return self

    def __imul__(self, scale: float) -> "MaskedImage":
        scale = float(scale)
        self.image *= np.float32(scale)
        self.variance *= np.float32(scale * scale)
        return self

    def __isub__(self, other) -> "MaskedImage":
        if isinstance(other, MaskedImage):
            self.image -= other.image
            self.variance += other.variance
            self.mask |= other.mask
        else:
            self.image -= np.asarray(other, dtype=np.float32)
        return self

    def __iadd__(self, other) -> "MaskedImage":
        if isinstance(other, MaskedImage):
            self.image += other.image
            self.variance += other.variance
            self.mask |= other.mask
        else:
            self.image += np.asarray(other, dtype=np.float32)
        return self

    def scaled_minus(self, c: float, other: "MaskedImage") -> "MaskedImage":
        """``image -= c*other.image``, ``variance += c**2 * other.variance``, ``mask |= other.mask``."""
        c = np.float32(c)
        self.image -= c * other.image
        self.variance += c * c * other.variance
        self.mask |= other.mask
        return self

    def divide_by(self, other: "MaskedImage") -> "MaskedImage":
        """Divide by another masked image (a flat), propagating the variance of a quotient."""
        with np.errstate(divide="ignore", invalid="ignore"):
            a2 = self.image * self.image
            b2 = other.image * other.image
            self.variance = ((self.variance + a2 * other.variance / b2) / b2).astype(np.float32)
            self.image = (self.image / other.image).astype(np.float32)
        self.mask |= other.mask
        return self
