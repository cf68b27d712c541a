"""User-facing errors.

Every problem a user can fix (a missing file, a 2D image, an impossible setting, a
checkpoint of another architecture) is raised as :class:`MaesilError` with one line that
names the problem and the fix. The CLI prints it and exits with status 2; the napari
widgets show it as a notification. Anything else is a bug and keeps its traceback.
"""


class MaesilError(Exception):
    """A problem in the user's input or settings, with a message that says how to fix it."""


class CheckpointError(MaesilError):
    """A checkpoint that is missing, corrupt, or of another architecture."""


class DataError(MaesilError):
    """An input volume or dataset that cannot be used (missing, corrupt, 2D, NaN, ...)."""


class ConfigError(MaesilError):
    """An impossible or inconsistent setting."""


class Cancelled(Exception):
    """Raised inside a job when the user asked it to stop (not an error)."""
