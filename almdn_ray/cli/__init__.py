"""The ``almdn-ray`` command line, one module per command group. A command parses, loads config and calls
one function; the work lives in the library."""

import importlib

from almdn_ray.cli.common import app

for _group in ("runs", "jobs", "data", "pool", "labels"):  # registration order is the order `--help` lists
    importlib.import_module(f"almdn_ray.cli.{_group}")

__all__ = ["app"]
