"""Options of ddf-pipeline's table that this hpcddf version reads but does not act on, and why.

Users' configs must load unchanged, so every option of the table is accepted; but an option
that changes nothing must not be silently ignored (an LGPS config's WSCMS settings, a tier1
config's elliptical final beam). ``submit`` (and ``--dry-run``) and ``config show`` print one
line per option that a config sets to something other than its default and that has no effect
here. ``tests/unit/test_option_effects.py`` walks the whole table: every option is either used
by the code or listed here, never both, so an option that gets implemented leaves this table.
"""

from __future__ import annotations

from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.options import lookup

NO_EFFECT: dict[tuple[str, str], str] = {
    ("control", "quiet"): "hpcddf writes every command's output to its own log file, never to a terminal",
    ("control", "nobar"): "hpcddf writes every command's output to its own log file, never to a terminal",
    ("control", "dryrun"): "use hpcddf submit --dry-run",
    ("control", "catch_signal"): "hpcddf always handles the walltime signal (requeue) and SIGUSR1 "
                                 "(stop at the next step)",
    ("control", "msss_mode"): "MSSS mode is not supported by this hpcddf version",
    ("control", "remove_columns"): "hpcddf never removes columns from the measurement sets",
    ("control", "pull"): "obsolete in ddf-pipeline too: hpcddf runs the installed versions",
    ("offsets", "mode"): "offsets always run in normal mode here",
}


def no_effect_warnings(cfg: PipelineConfig) -> list[str]:
    """One line for each option the config sets away from its default that has no effect here."""
    lines = []
    for (section, name), why in NO_EFFECT.items():
        opt = lookup(section, name)
        if opt is None or cfg.get(section, name) == opt.default:
            continue
        origin = cfg.origins.get(opt.key)
        where = f" (set in {origin})" if origin else ""
        lines.append(f"warning: [{section}] {name} has no effect{where}: {why}")
    return lines + partial_effects(cfg)


def partial_effects(cfg: PipelineConfig) -> list[str]:
    """Options that take effect, but not all of it here: one line each."""
    from hpcddf.lofar.ddfcommands import DDF_MODE_FALLBACK, ddf_cleanmode
    lines = []
    if cfg.get("spectra", "do_dynspec") and cfg.get("image", "beam_model") not in (None, "None"):
        lines.append("warning: [spectra] do_dynspec: the dynamic spectra are made without the beam "
                     f"([image] beam_model {cfg.get('image', 'beam_model')}): hpcddf's extraction applies "
                     "none, so their fluxes are apparent")
    mode = cfg.get("image", "cleanmode")
    if mode in DDF_MODE_FALLBACK:
        lines.append(f"warning: [image] cleanmode {mode} is not in DDFacet 0.9.1.0 (which killMS 3.3.0 "
                     f"needs): the images are cleaned with {DDF_MODE_FALLBACK[mode]}")
    if ddf_cleanmode(cfg) == "WSCMS":
        lines.append("warning: [masking] WSCMS auto-masking applies only to images without a clean mask: "
                     "DDFacet 0.9.1.0's WSCMS stops when given both, so the others are cleaned inside "
                     "their mask alone")
    return lines
