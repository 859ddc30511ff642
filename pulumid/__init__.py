"""pulumid: a self-hosted, Pulumi Cloud-compatible state backend on Twisted."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pulumid")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
