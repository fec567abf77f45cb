"""The one error type of dmoe.checkpoint."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str(err) is one line naming the file and the fault."""
