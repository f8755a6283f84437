"""Errors raised by the input pipeline."""


class DatasetNotFoundError(FileNotFoundError):
  """The data is not where the config says; the message says how to get it."""


class DataFormatError(ValueError):
  """A data file exists but is truncated, corrupted or of the wrong format."""
