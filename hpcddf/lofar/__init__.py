"""The ddf-pipeline reduction (DDFacet + killMS): options, config, the step table, step
builders, node tools, redo, bootstrap, offsets, quality, simulation and the demo."""
