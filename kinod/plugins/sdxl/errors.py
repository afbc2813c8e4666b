"""What can go wrong in an sdxl job, each with a message a user can act on."""

from __future__ import annotations


class SdxlError(Exception):
    """A failure the job reports as its error message; ``retryable`` marks one worth retrying."""

    retryable = False


class InvalidJob(SdxlError):
    """The job's parameters or model cannot work; nothing was sent."""


class SettingsError(SdxlError):
    """``plugins.sdxl`` in config.yaml is wrong."""


class Unreachable(SdxlError):
    """No ComfyUI server answered; it may be back soon."""

    retryable = True


class PromptRejected(SdxlError):
    """ComfyUI refused the workflow (its own validation errors)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ExecutionFailed(SdxlError):
    """ComfyUI accepted the prompt but a node failed while running it."""


class PromptLost(SdxlError):
    """The server went away or forgot the prompt; the job never finished there."""

    retryable = True


class OutputMissing(SdxlError):
    """ComfyUI says it finished, but the images cannot be fetched."""

    retryable = True


class UnexpectedAnswer(SdxlError):
    """ComfyUI answered something this plugin cannot read."""

    retryable = True


class Interrupted(SdxlError):
    """Someone else interrupted the prompt on the server (older servers interrupt whatever
    runs, whoever asks)."""

    retryable = True
