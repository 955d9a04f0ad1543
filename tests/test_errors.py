"""One exception hierarchy and the retry policy (calib_core/errors.py)."""

import errno

import pytest
from sqlalchemy.exc import OperationalError

from calib_core.buildplan import InconsistentInputs
from calib_core.camera import CameraError
from calib_core.errors import CalibflowError, ConfigError, DataError, InputError, TransientError, is_retryable
from calib_core.io.products import ProductError
from calib_core.io.raw import RawReadError
from calib_core.isr.process import IsrError
from calib_core.repository import CameraMismatch, DatastoreError, RegistryError
from calib_core.science import MissingCalib
from calib_core.sky.frames import SkyRejectionError


@pytest.mark.parametrize("cls, kind", [
    (RawReadError, InputError), (ProductError, InputError), (DatastoreError, InputError),
    (InconsistentInputs, InputError), (MissingCalib, InputError), (CameraError, ConfigError),
    (IsrError, DataError), (SkyRejectionError, DataError), (RegistryError, CalibflowError),
    (CameraMismatch, RegistryError)])
def test_every_error_is_a_calibflow_error_of_its_kind(cls, kind):
    assert issubclass(cls, kind) and issubclass(cls, CalibflowError)
    # callers that caught the old bases keep working
    assert issubclass(cls, RuntimeError if issubclass(cls, RegistryError) else ValueError)


def test_retry_policy_is_explicit():
    assert not is_retryable(RawReadError("raw.fits", "no HDU"))
    assert not is_retryable(DataError("no good pixels"))
    assert not is_retryable(KeyError("x")) and not is_retryable(RuntimeError("bug"))
    assert is_retryable(TransientError("file system busy"))
    assert is_retryable(OSError(errno.EIO, "I/O error"))
    dropped = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    assert is_retryable(dropped)
    assert not is_retryable(OperationalError("SELECT 1", {}, Exception('relation "x" does not exist')))
