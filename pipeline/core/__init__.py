"""The building blocks the stage scripts share: configuration, tasks, data, models, prompts, scoring, metrics, the
run directory, task weighting, registries, fault points and the Ray backend.

Nothing here imports a stage script, the CLI or the Python API (`tests/test_layers.py` checks it).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sentimerge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
