"""dbfeed: a live database change feed from Postgres, MongoDB and Redis to Socket.IO rooms."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dbfeed")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
