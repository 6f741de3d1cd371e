"""Federated methods, each a registered class in its own module. Importing this package
registers them all; `build_method(config)` picks one by `method.name`."""

from fedpit.methods import fedavg, fedpit  # noqa: F401  (registration side effect)
from fedpit.methods.base import METHODS, ClientContext, Method, build_method

__all__ = ["METHODS", "ClientContext", "Method", "build_method"]
