"""The engine: plans of units of work -> Slurm or local jobs -> the node job (preflight,
scratch, runner, requeue) -> field state -> status. It knows no pipeline."""
