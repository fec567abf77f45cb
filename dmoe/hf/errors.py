"""The one error type of dmoe.hf."""


class HFError(ValueError):
    """A Hugging Face checkpoint or a conversion that cannot be done; str(err) is one line
    naming the file, tensor or option and the values."""
