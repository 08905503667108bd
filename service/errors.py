"""Errors of the :mod:`service` package: what a user sent that cannot be segmented::

    ValueError
    └── InputError                 bad input; the message says what was expected
        ├── NotATiffError          not a TIFF at all                    (HTTP 415)
        ├── CorruptImageError      a TIFF that is truncated or corrupt  (HTTP 400)
        ├── ImageTooLargeError     more pixels/bytes than allowed        (HTTP 413)
        └── UnsupportedImageError  dtype, axes or channels not usable   (HTTP 422)

Errors of the lower packages (:class:`unet.UNetError`, :class:`tiling.TilingError`)
pass through unchanged; the HTTP app maps all of them to status codes in one place.
"""

from __future__ import annotations

__all__ = ["CorruptImageError", "ImageTooLargeError", "InputError", "NotATiffError", "UnsupportedImageError"]


class InputError(ValueError):
    """Input the service refuses; the message says what was expected."""


class NotATiffError(InputError):
    """The bytes are not a TIFF file."""


class CorruptImageError(InputError):
    """A TIFF whose structure or data is truncated or corrupt."""


class ImageTooLargeError(InputError):
    """An image (or upload) larger than the configured limit."""


class UnsupportedImageError(InputError):
    """A readable image with a dtype, layout or channel count the model cannot take."""
