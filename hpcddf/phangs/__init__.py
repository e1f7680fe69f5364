"""PHANGS-ALMA-style spectral-line products (cubes, noise, masks, moments) on hpcddf's engine.

A second pipeline family beside the LOFAR reduction: key files describe targets, array
configurations and products; their loops become Slurm job arrays. CASA stages run in their own
environment (a container image or a separate virtual environment); derived products run here.
"""
