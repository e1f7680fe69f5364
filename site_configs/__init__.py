"""Site configs shipped with hpcddf (one TOML per cluster); a package only so the wheel carries them."""
