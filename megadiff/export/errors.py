"""Errors of ``megadiff convert``."""


class ConvertError(ValueError):
    """Bad input or output of a conversion; the message names the path."""


class ParityError(RuntimeError):
    """The converted model's logits differ from the source's beyond the tolerance."""
