"""rkmqtt: an MQTT bridge that batches language-model requests onto an RK3588 NPU."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rkmqtt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
