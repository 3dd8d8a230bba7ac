"""The release of kvflock: what `kvflock --version`, the APIs' /version and their OpenAPI documents report,
and the version setuptools gives the distribution."""

__version__ = "0.1.0"
