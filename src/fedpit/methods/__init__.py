"""Federated methods, each a registered class in its own module. Importing this package
registers them all; `build_method(config)` picks one by `method.name`."""

from fedpit.methods import centralized, fedavg, fedmit, fedopt, fedpit, fedprox, local, scaffold  # noqa: F401
from fedpit.methods.base import METHODS, ClientContext, Method, build_method

__all__ = ["METHODS", "ClientContext", "Method", "build_method"]
