"""Chunked imaging: a large cube's channels imaged as N chunk tasks, then gathered.

The PHANGS team images large cubes in channel chunks as separate jobs plus a gather step, each
chunk in its own temporary directory because CASA's temporary products of parallel jobs
collided (phangs_imaging_scripts PR #228, #246). Here a chunked cube is N ``imaging`` tasks
keyed ``(target, product, config, chunkK)`` that run the same recipe and steps as the single
call on their slice of the channels, each in its own directory, plus the cube's ordinary
``imaging`` task, which waits for them and gathers their images into the cube with the names
and layout of the single call (``casa_tasks gather_chunks``). On Slurm the chunks of one cube
are ONE job array (:func:`array_groups`); a chunk killed by its walltime is requeued alone
and a resubmission reruns only the chunks without their done-marker.

How many chunks (line products only; a continuum image is one plane):

* the line product's ``chunksize`` in config_definitions (channels per chunk, as PHANGS's
  ImagingChunkedHandler ``chunksize``): ``ceil(nchan / chunksize)`` chunks;
* ``chunksize`` 0 (the default): from the memory of the site's node when the imaging recipe
  fixes ``imsize``: the cube's working images (:data:`BYTES_PER_VOXEL` per voxel) must fit in
  :data:`MEMORY_FRACTION` of it; with dynamic sizing (no ``imsize`` in the recipe) the image
  size is only known once the staged data exist, so the cube is imaged whole: give
  ``chunksize`` for a cube too large for one node.

``nchan`` is the nominal channel count of the line window (vsys +- vwidth/2 + statwt_edge_kms
on each side, in channel_kms channels), the cube extract_line makes when the data cover the
window; each chunk takes its slice of the staged MS's actual channels at run time
(:func:`hpcddf.phangs.casa_imaging.chunk_range`), so a cube with fewer channels is still
covered exactly once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_common import Task, _key_files, _task
from hpcddf.phangs.project import Project

BYTES_PER_VOXEL = 64  # image, residual, model, psf, pb, weight, mask, sumwt (float32) x2 for
#                       the FFT grids and the numpy copies the mask steps read
MEMORY_FRACTION = 0.5
CHANNEL_SELECTION = ("start", "nchan", "width")  # what the chunks set; a recipe must not
MARKER = "chunk.done.json"


def nominal_nchan(project: Project, target: str, product: str) -> int:
    """The channels extract_line makes for a line product when the data cover its window."""
    t = project.target_defs[target]
    line = project.configs.line_product[product]
    return max(1, math.floor((t.vwidth_kms + 2.0 * line.statwt_edge_kms) / line.channel_kms
                             + 1e-6))


def chunk_count(project: Project, target: str, product: str, recipes: dict[str, Any],
                node_mem_gb: float | None) -> int:
    """How many chunks the cube of (target, product) is imaged in (1: whole)."""
    line = project.configs.line_product[product]
    nchan = nominal_nchan(project, target, product)
    if line.chunksize < 0:
        raise ConfigError(f"line_product {product}: chunksize {line.chunksize} is negative "
                          f"({_key_files(project, 'config_key')})",
                          "give the channels per chunk, or 0 to size chunks from the node's "
                          "memory")
    if line.chunksize > 0:
        return math.ceil(nchan / line.chunksize)
    imsize = recipes.get("dirty", {}).get("imsize")
    if not imsize or not node_mem_gb:
        return 1
    nx, ny = (imsize, imsize) if isinstance(imsize, int) else (imsize[0], imsize[-1])
    need = nchan * int(nx) * int(ny) * BYTES_PER_VOXEL
    return max(1, math.ceil(need / (MEMORY_FRACTION * node_mem_gb * 1e9)))


def _check_recipes(project: Project, params: dict[str, Any]) -> None:
    for stage, recipe in params["recipes"].items():
        owned = [k for k in CHANNEL_SELECTION if k in recipe]
        if owned:
            path = project.imaging_recipes(params["config"], params["product"], stage)
            raise ConfigError(f"{path}: {owned[0]} is set, but the cube of {params['target']} "
                              f"{params['product']} is imaged in chunks, which choose the "
                              f"channels themselves",
                              "leave start/nchan/width out of the recipe (the line product's "
                              "channel_kms sets the channels), or set chunksize 0 in the "
                              "line product")


def chunk_base(base: str, index: int, count: int) -> str:
    """A chunk's imagename, in a directory of its own beside the cube's products."""
    stem = Path(base).name
    return str(Path(f"{base}_chunks") / f"chunk{index}of{count}" / f"{stem}_chunk{index}")


def chunk_tasks(project: Project, key: tuple[str, ...], params: dict[str, Any],
                depends: Sequence[str], node_mem_gb: float | None) -> list[Task]:
    """The chunk tasks of one cube's imaging (none when it is imaged whole)."""
    if params.get("kind") != "line":
        return []
    count = chunk_count(project, params["target"], params["product"], params["recipes"],
                        node_mem_gb)
    if count < 2:
        return []
    _check_recipes(project, params)
    tasks = []
    for k in range(count):
        base = chunk_base(params["imagename"], k, count)
        marker = str(Path(base).parent / MARKER)
        tasks.append(_task("imaging", (*key, f"chunk{k}"), depends, {
            **params, "imagename": base, "chunk": [k, count], "marker": marker,
            "inputs": list(params["inputs"]), "outputs": [marker]}))
    return tasks


def gather_params(params: dict[str, Any], chunks: Sequence[Task]) -> dict[str, Any]:
    """The cube's imaging task as the gather of its chunks: same products as the single call."""
    return {**params, "inputs": [t.params["marker"] for t in chunks],
            "gather": [t.params["imagename"] for t in chunks]}


def array_groups(tasks: Sequence[Task]) -> list[list[Task]]:
    """A stage's tasks split into the arrays they are submitted as, keeping their order: each
    cube's chunk tasks one array, and the runs of other tasks between them one array each."""
    groups: list[list[Task]] = []
    last: object = object()
    for t in tasks:
        tag = t.key[:-1] if "chunk" in t.params else None
        if not groups or tag != last or (tag is None) != (last is None):
            groups.append([])
        groups[-1].append(t)
        last = tag
    return groups
