"""Run each science command of a stage inside the site's container: Apptainer/Singularity or
Charliecloud, or directly when the site has none.

Every runtime gets the same contract, so DDFacet behaves the same in all of them:

* **binds** at the same path inside as outside: the field directory, the node-local scratch
  (the DDF cache and TMPDIR), the catalogue directory, the site's extra binds, and the host's
  ``/dev/shm`` (DDFacet's shared arrays must be the host's, sized by the node's preflight);
* **a clean environment** with only what the science needs passed explicitly: thread counts
  (OMP/OPENBLAS/MKL = 1), ``TMPDIR`` on the bound scratch, and the step's own variables;
* **the field directory as working directory**; the exit code of the contained command; output
  to the step's log (the runner's pipes) and signals to the contained process (the runtime
  is exec'd by the runner into the command's own process group).

The argv for Apptainer/Singularity is built with spython's own command helpers, with the
executable name from the site (``apptainer`` or ``singularity``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from hpcddf.engine.runner import Command
from hpcddf.errors import SiteError

Launcher = Callable[[Command, Path], list[str]]

DEFAULT_EXECUTABLE = {"apptainer": "apptainer", "singularity": "singularity",
                      "charliecloud": "ch-run", "none": ""}
SHM = "/dev/shm"
# Host directories ch-run binds into every container by itself.
CH_HOST_DIRS = ("/tmp", "/dev")
# Host variables that must never leak into a contained science command's environment.
SCIENCE_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Apptainer gives a clean-env container its own PATH and HOME; ch-run passes the host's (or,
# after --unset-env, none), so the image's standard PATH and a HOME are set explicitly (a site
# may override either).
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def default_executable(runtime: str) -> str:
    return DEFAULT_EXECUTABLE.get(runtime, runtime)


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a launcher needs: the runtime, the image and what to bind and pass."""

    runtime: str
    image: str
    executable: str
    binds: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)

    def bind_paths(self) -> list[str]:
        """Paths bound at the same place inside, /dev/shm always; a path inside another bound
        one is left out (its parent's bind already shows it, and Charliecloud could not create
        its mount point in a read-only image)."""
        return outermost([*self.binds, SHM])


def _inside(path: PurePosixPath, parent: PurePosixPath) -> bool:
    return path != parent and path.is_relative_to(parent)


def outermost(paths: Sequence[str]) -> list[str]:
    """The unique paths not inside another one of them, in their first order."""
    clean = list(dict.fromkeys(str(PurePosixPath(p)) for p in paths))
    return [p for p in clean
            if not any(_inside(PurePosixPath(p), PurePosixPath(q)) for q in clean)]


def missing_mount_points(spec: ContainerSpec) -> list[str]:
    """Bind targets a Charliecloud directory image lacks: ch-run mounts images read-only and
    cannot create them. Paths below /tmp and /dev are there already (ch-run binds the host's)."""
    image = Path(spec.image)
    if spec.runtime != "charliecloud" or not image.is_dir():
        return []
    return [p for p in spec.bind_paths()
            if not any(_inside(PurePosixPath(p), PurePosixPath(d)) or p == d for d in CH_HOST_DIRS)
            and not (image / p.lstrip("/")).is_dir()]


def check_mount_points(spec: ContainerSpec) -> None:
    missing = missing_mount_points(spec)
    if missing:
        raise SiteError(f"container image {spec.image} has no mount point for {', '.join(missing)}",
                        "create them in the image (mkdir -p IMAGE/PATH) or bind a parent directory "
                        "that exists in it via [container] binds")


def check_binds(spec: ContainerSpec) -> None:
    """Every bind must exist on this node (spython would sys.exit, ch-run abort, otherwise)."""
    for path in spec.bind_paths():
        if not Path(path).exists():
            raise SiteError(f"container bind path {path} does not exist on this node",
                            "fix [container] binds or [paths] catalog_dir in the site file")


def container_env(spec: ContainerSpec, cmd: Command) -> dict[str, str]:
    """The contained command's whole environment: science defaults, the stage's, the step's."""
    return {**SCIENCE_ENV, **spec.env, **cmd.env}


def apptainer_argv(spec: ContainerSpec, cmd: Command, workdir: Path) -> list[str]:
    """``apptainer exec --cleanenv --pwd WORKDIR --bind ... --env K=V ... IMAGE argv...``."""
    from spython.main import Client
    base = Client._init_command("exec")  # ["singularity", ("--quiet",) "exec"]
    argv = [spec.executable] + base[1:]
    argv += ["--cleanenv", "--pwd", str(workdir)]
    argv += Client._generate_bind_list(spec.bind_paths())
    for key, value in sorted(container_env(spec, cmd).items()):
        argv += ["--env", f"{key}={value}"]
    return argv + [spec.image, *cmd.argv]


def charliecloud_argv(spec: ContainerSpec, cmd: Command, workdir: Path) -> list[str]:
    """``ch-run --unset-env='*' --set-env=K=V ... -b P:P ... --cd=WORKDIR IMAGE -- argv...``."""
    argv = [spec.executable, "--unset-env=*"]
    env = container_env(spec, cmd)
    # casacore refuses to open a table without HOME ("The HOME environment variable has not
    # been set"); the stage's TMPDIR, on the bound scratch, is writable and leaks nothing
    for key, value in sorted({"PATH": IMAGE_PATH, "HOME": env.get("TMPDIR", "/tmp"), **env}.items()):
        argv.append(f"--set-env={key}={value}")
    for path in spec.bind_paths():
        argv += ["-b", f"{path}:{path}"]
    return argv + [f"--cd={workdir}", spec.image, "--", *cmd.argv]


BUILDERS: dict[str, Callable[[ContainerSpec, Command, Path], list[str]]] = {
    "apptainer": apptainer_argv, "singularity": apptainer_argv, "charliecloud": charliecloud_argv,
}


def make_launcher(spec: ContainerSpec) -> Launcher:
    """The runner's launcher for this container (the runner runs the argv it returns)."""
    try:
        build = BUILDERS[spec.runtime]
    except KeyError:
        raise SiteError(f"container runtime {spec.runtime!r} has no launcher",
                        f"use one of {', '.join(BUILDERS)} or none") from None
    check_mount_points(spec)

    def launch(cmd: Command, workdir: Path) -> list[str]:
        check_binds(spec)
        return build(spec, cmd, workdir)
    return launch


def spec_for(runtime: str, image: str | None, executable: str | None, site_binds: Sequence[str],
             workdir: Path, scratch: Path, catalog_dir: str | None, tmpdir: Path,
             site_env: Mapping[str, str] | None = None) -> ContainerSpec:
    """The container of one stage job: the field, its scratch and catalogues bound, TMPDIR set."""
    if not image:
        raise SiteError(f"container runtime {runtime} needs an image", "set [container] image")
    binds = [str(workdir), str(scratch), *([catalog_dir] if catalog_dir else []), *site_binds]
    return ContainerSpec(runtime=runtime, image=image,
                         executable=executable or default_executable(runtime),
                         binds=tuple(binds), env={**(site_env or {}), "TMPDIR": str(tmpdir)})
