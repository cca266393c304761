"""Domain exceptions.

Library code raises these; only ``cli.py`` turns them into click errors, and the daemon turns them into JSON
errors with an HTTP status. Each carries a message that reads as one complete line for a user.
"""


class SimmergeError(Exception):
    """Base class of every error a user can cause or fix."""

    #: HTTP status the daemon answers with for this error.
    http_status = 400


class NotFound(SimmergeError):
    """A named model, task, operator, probe set or decision does not exist."""

    http_status = 404


class AlreadyExists(SimmergeError):
    """A name that must be unique is already taken."""

    http_status = 409


class InvalidInput(SimmergeError):
    """A value, file or parameter is malformed or out of range."""


class InvalidCheckpoint(InvalidInput):
    """A path is not a usable Hugging Face safetensors checkpoint."""


class IncompatibleModels(InvalidInput):
    """Two checkpoints cannot be compared or merged (tensor names, shapes, vocabularies)."""


class StateLocked(SimmergeError):
    """Another process holds the state database for writing."""

    http_status = 423


class Forbidden(SimmergeError):
    """The daemon was not started to allow this through its API (e.g. external evaluation commands)."""

    http_status = 403


class Conflict(SimmergeError):
    """The request contradicts what is already recorded (e.g. a different reward for the same decision)."""

    http_status = 409


class CorruptState(SimmergeError):
    """The state database cannot be read (the message names the file and how to restore it)."""

    http_status = 500


class Unsupported(SimmergeError):
    """A feature (e.g. of a mergekit config) that this version does not implement."""


class EvaluationFailed(SimmergeError):
    """An evaluator could not produce a score; the reason is recorded, never fatal to a loop."""
