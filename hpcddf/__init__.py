"""hpcddf: LOFAR direction-dependent reductions (ddf-pipeline) as chained, requeueable HPC jobs."""

__version__ = "0.1.0"
