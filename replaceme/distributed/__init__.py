"""Calibration and merge on a Ray cluster (``pip install 'replaceme[ray]'``)."""
