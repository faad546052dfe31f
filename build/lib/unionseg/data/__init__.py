"""Data: IO, catalog, phantom, preprocessing, sampling."""
