"""Errors of the :mod:`service` package: what a user sent that cannot be segmented or served::

    ValueError
    └── InputError                  bad input; the message says what was expected  (HTTP 400)
        ├── NotATiffError           not a TIFF at all                               (HTTP 415)
        ├── CorruptImageError       a TIFF that is truncated or corrupt             (HTTP 400)
        ├── ImageTooLargeError      more pixels/bytes than allowed                  (HTTP 413)
        ├── UnsupportedImageError   dtype, axes or channels not usable              (HTTP 422)
        └── JobError                a job request that cannot be served             (HTTP 400)
            ├── InvalidJobIdError   malformed id                                    (HTTP 422)
            ├── JobNotFoundError    unknown or expired id                           (HTTP 404)
            ├── JobNotReadyError    no result (yet)                                 (HTTP 409)
            ├── JobsOffError        /jobs is off on this server (its settings say why) (HTTP 503)
            └── QuotaExceededError  the jobs directory is full                      (HTTP 507)

    ConnectionError
    └── ClusterError                the Dask scheduler cannot be reached, or has no usable worker

    OSError
    └── StorageError                output or temporary data could not be written
        └── StorageFullError        no space left on the device, or the disk quota  (HTTP 507)

:func:`storage_error` turns the ``OSError`` of a failed write into one of the latter two,
with a message that says what was being written (and no path): a full disk is an
operating condition the client or user can act on, not an internal error.

Errors of the lower packages (:class:`unet.UNetError`, :class:`tiling.TilingError`)
pass through unchanged; the HTTP app maps all of them to status codes in one place.
"""

from __future__ import annotations

import errno
from typing import TypeGuard

__all__ = [
    "ClusterError",
    "CorruptImageError",
    "ImageTooLargeError",
    "InputError",
    "InvalidJobIdError",
    "JobError",
    "JobNotFoundError",
    "JobNotReadyError",
    "JobsOffError",
    "NotATiffError",
    "OptionError",
    "QuotaExceededError",
    "StorageError",
    "StorageFullError",
    "TileNotFoundError",
    "UnsupportedImageError",
    "is_storage_full",
    "storage_error",
]

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


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


class OptionError(InputError):
    """Options that do not go together (a table without instances, a pyramid of probabilities)."""


class JobError(InputError):
    """A job request that cannot be served; the message says why."""


class InvalidJobIdError(JobError):
    """The id is not of the form the store hands out."""


class JobNotFoundError(JobError):
    """No such job (never existed, deleted, or expired)."""


class JobNotReadyError(JobError):
    """The job has no result to download (still running, failed or cancelled)."""


class TileNotFoundError(JobError):
    """A preview tile or level outside the job's preview pyramid."""


class JobsOffError(JobError):
    """``/jobs`` is off on this server (``UNET_JOBS_WORKERS=0``, a missing extra, a jobs
    directory taken by another process): a retry will not help until its settings change."""


class QuotaExceededError(JobError):
    """Storing this upload would take the jobs directory over its quota."""


class ClusterError(ConnectionError):
    """The Dask scheduler named cannot be reached, or no worker can run the tasks; the
    message names the scheduler."""


class StorageError(OSError):
    """A write that failed (read-only file system, permission denied, ...); the message says which."""


class StorageFullError(StorageError):
    """A write that failed because the device (``ENOSPC``) or the disk quota (``EDQUOT``) is full."""


def is_storage_full(exc: BaseException) -> TypeGuard[OSError]:
    """Whether ``exc`` says the disk (or the quota) is full.

    >>> import errno
    >>> is_storage_full(OSError(errno.ENOSPC, "No space left on device")), is_storage_full(OSError(errno.EACCES, "x"))
    (True, False)
    """
    return isinstance(exc, StorageFullError) or (isinstance(exc, OSError) and exc.errno in _FULL)


def storage_error(exc: OSError, doing: str) -> StorageError:
    """The domain error for ``exc``, raised while ``doing`` (e.g. "writing the result").

    >>> import errno
    >>> str(storage_error(OSError(errno.ENOSPC, "No space left on device", "/tmp/x"), "writing the result"))
    'no space left on device while writing the result'
    >>> e = storage_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x"), "writing mask.tif")
    >>> type(e).__name__, str(e)
    ('StorageError', 'read-only file system while writing mask.tif')
    """
    if isinstance(exc, StorageError):
        return exc
    if exc.errno in _FULL:
        return StorageFullError(f"{_FULL[exc.errno]} while {doing}")
    reason = (exc.strerror or type(exc).__name__).lower()
    return StorageError(f"{reason} while {doing}")
