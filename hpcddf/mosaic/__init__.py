"""Mosaics of neighbouring reduced fields: pointings, the mosaic maths and its jobs."""
