"""The one family of user-facing errors.

Every message says what was expected and what was found, so the CLI can print it on one line
without a traceback. Internal invariants use ``assert``; anything a user can cause raises one of these.
"""

from __future__ import annotations


class MindhierError(Exception):
    """Base class: a problem with the user's inputs, files or environment."""


class ConfigError(MindhierError):
    """Unknown preset, inconsistent config values."""


class ScheduleError(ConfigError):
    """patch_nums / level counts that do not make a valid scale schedule."""


class CheckpointError(MindhierError):
    """Missing, corrupt or mismatching checkpoint files."""


class InputError(MindhierError):
    """Bad voxel data: wrong shape, wrong voxel count, NaN/inf values, unknown subject."""


class BundleError(MindhierError):
    """An engine bundle that is missing files, altered, malformed, reaches outside its folder, or is of another
    format version."""


class OutputError(MindhierError):
    """An output path that cannot be used: a file where a folder is expected, no permission, a folder that holds
    someone else's files, or a folder another run is writing into."""


class BackendError(MindhierError):
    """A backend that is missing, misconfigured or asked for something it cannot do."""


class MissingDependencyError(BackendError):
    """An optional dependency (TensorRT, a CUDA GPU, cuda-python) that this command needs is absent.

    The message names what is missing and how to install it; the CLI exits with code 2 for these.
    """


class TrainingInterrupted(MindhierError):
    """Training stopped on SIGINT / SIGTERM after saving its state; running the same command again resumes.

    The CLI prints the message and exits with 128 + the signal number, as a shell does for a killed command.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
