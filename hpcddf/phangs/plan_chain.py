"""The derived chain of one config: its resolution levels and their files.

A ``derived`` task convolves the postprocessed cube to every resolution of the derived key
and of the config's own ``res_*`` fields (angular, then physical) and makes a noise cube and a strict mask at each level; this module
names those files, orders the levels by resolution and lists the configs whose strict masks a
broad mask joins. Used by the moment planner (:mod:`hpcddf.phangs.plan_moments`), which makes
another config's chain for a prior, and by the derived planner (:mod:`hpcddf.phangs.plan_derived`).
"""

from __future__ import annotations

from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_casa import postprocess_cube
from hpcddf.phangs.plan_common import (
    CONVOLVE_KW,
    NOISE_KW,
    STRICTMASK_KW,
    _key_files,
    _mapped_kw,
    whole_target_configs,
)
from hpcddf.phangs.project import Project, cube_filename

RAD_ARCSEC = 206_264.806


def linked_mask_configs(project: Project, whole: str, product: str, config: str) -> list[str]:
    """The other configs whose strict masks this config's broad mask joins (those that exist
    for this target and product)."""
    existing = whole_target_configs(project, whole, product)
    links = project.derived_params(config, product).mask_configs
    return [c for c in links if c != config and c in existing]


def _derived_name(project: Project, whole: str, config: str, product: str, ext: str | None
                  ) -> str:
    return str(project.derived_dir(whole) / cube_filename(whole, config, product, ext))


def _ladder(lo: float, hi: float, step: float) -> list[float]:
    """lo, lo*step, lo*step**2, ... up to hi (inclusive); one value when lo == hi."""
    if lo <= 0 or hi <= 0:
        return []
    out = [lo]
    while step > 1.0 and out[-1] * step <= hi * (1.0 + 1e-9):
        out.append(out[-1] * step)
    return out


def _res_tag(value: float, unit: str) -> str:
    """'1p10as', '150pc': two decimals with 'p' for the point (file names keep no dots)."""
    text = f"{value:.2f}".replace(".", "p")
    if unit == "pc" and text.endswith("p00"):
        text = text[:-3]
    return text + unit


def config_resolutions(project: Project, config: str) -> tuple[dict[str, float],
                                                               dict[str, float]]:
    """The resolutions a config's own ``res_*`` fields ask for: (angular {tag: arcsec},
    physical {tag: pc}). ``res_list`` (arcsec) and the geometric ladders res_min..res_max by
    res_step_factor; the key reader has checked that the fields go together."""
    cfg: Any = (project.configs.interf_config.get(config)
                or project.configs.feather_config[config])
    ang = [float(v) for v in cfg.res_list]
    ang += _ladder(cfg.res_min_arcsec, cfg.res_max_arcsec, cfg.res_step_factor)
    phys = _ladder(cfg.res_min_pc, cfg.res_max_pc, cfg.res_step_factor)
    return ({_res_tag(v, "as"): v for v in ang}, {_res_tag(v, "pc"): v for v in phys})


def _merged(from_key: dict[str, float], from_config: dict[str, float], what: str,
            config: str, product: str, project: Project) -> dict[str, float]:
    """The derived key's resolutions plus the config's, a size given by both kept once."""
    out = dict(from_key)
    for tag, size in from_config.items():
        if any(abs(size - v) <= 1e-9 * size for v in out.values()):
            continue
        if tag in out:
            raise ConfigError(f"config {config} product {product}: {what} tag {tag!r} of the "
                              f"derived key ({out[tag]:g}) differs from the config's res_* "
                              f"resolution of that tag ({size:g})",
                              f"rename the derived key's tag "
                              f"({_key_files(project, 'derived_key')})")
        out[tag] = size
    return out


def _resolutions(project: Project, whole: str, config: str, product: str
                 ) -> list[dict[str, Any]]:
    """Angular then physical resolutions, each by increasing size (PHANGS' order): those of
    the derived key and those of the config's res_* fields."""
    dp = project.derived_params(config, product)
    cfg_ang, cfg_phys = config_resolutions(project, config)
    ang = _merged(dp.ang_res, cfg_ang, "ang_res", config, product, project)
    phys = _merged(dp.phys_res, cfg_phys, "phys_res", config, product, project)
    clash = sorted(set(ang) & set(phys))
    if clash:
        raise ConfigError(f"config {config} product {product}: resolution tag {clash[0]!r} is "
                          f"both an ang_res and a phys_res ({_key_files(project, 'derived_key')})",
                          "give the two resolutions different tags")
    out: list[dict[str, Any]] = [{"tag": tag, "ang_arcsec": size}
                                 for tag, size in sorted(ang.items(), key=lambda kv: kv[1])]
    out += [{"tag": tag, "phys_pc": size}
            for tag, size in sorted(phys.items(), key=lambda kv: kv[1])]
    return out


def _chain(project: Project, whole: str, product: str, config: str, detailed: bool
           ) -> dict[str, Any]:
    """Convolution, noise and strict-mask products of one config (native and every res)."""
    res = _resolutions(project, whole, config, product)

    def name(ext: str | None) -> str:
        return _derived_name(project, whole, config, product, ext)
    levels = [{"tag": "", "cube": name(None), "coverage": name("coverage"),
               "coverage2d": name("coverage2d"), "noise": name("noise"),
               "strictmask": name("strictmask")}]
    for r in res:
        t = r["tag"]
        levels.append({**r, "cube": name(t), "coverage": name(f"{t}_coverage"),
                       "coverage2d": name(f"{t}_coverage2d"), "noise": name(f"{t}_noise"),
                       "strictmask": name(f"{t}_strictmask")})
    chain: dict[str, Any] = {"config": config, "cube_in": postprocess_cube(project, whole,
                                                                          product, config),
                             "levels": levels}
    if detailed:
        dp = project.derived_params(config, product)
        chain["noise_kw"] = _mapped_kw(project, dp.noise_kw, NOISE_KW, "noise_kw", config,
                                       product)
        chain["strictmask_kw"] = _mapped_kw(project, dp.strictmask_kw, STRICTMASK_KW,
                                            "strictmask_kw", config, product)
        chain["convolve_kw"] = _mapped_kw(project, dp.convolve_kw, CONVOLVE_KW, "convolve_kw",
                                          config, product)
        if any("phys_pc" in r for r in res) and not project.distance_mpc(whole):
            raise ConfigError(f"{whole}: config {config} product {product} has physical "
                              f"resolutions (phys_res) but no distance",
                              f"add {whole} to the distance key "
                              f"({_key_files(project, 'distance_key')})")
    return chain


def _chain_products(chain: dict[str, Any]) -> list[str]:
    return [lvl[k] for lvl in chain["levels"]
            for k in ("cube", "coverage", "coverage2d", "noise", "strictmask")]


def _level_arcsec(level: dict[str, Any], distance_mpc: float | None) -> float:
    """A level's resolution, to order levels finest first (native: 0; no distance: last)."""
    if "ang_arcsec" in level:
        return float(level["ang_arcsec"])
    if "phys_pc" in level:
        if not distance_mpc:
            return float("inf")
        return float(level["phys_pc"]) / (float(distance_mpc) * 1e6) * RAD_ARCSEC
    return 0.0


def _finest_first(levels: list[dict[str, Any]], distance_mpc: float | None
                  ) -> list[dict[str, Any]]:
    return sorted(levels, key=lambda lvl: _level_arcsec(lvl, distance_mpc))
