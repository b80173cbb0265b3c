"""sentimerge: stage scripts, CLI, configuration, tasks, data, models and scoring."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sentimerge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
