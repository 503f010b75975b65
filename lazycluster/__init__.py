"""lazycluster: a Dask cluster on a handful of SSH hosts with one call."""

__version__ = "0.3.0.dev0"
