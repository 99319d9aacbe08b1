"""Pure compute: series selection, series -> volume, MONAI bundle runtime, findings, SR/SEG writers.

Rules of this room (DESIGN.md): no database, no network, no clock. Inputs are files and arrays,
outputs are value objects and pydicom datasets.
"""
