"""Errors caused by the user's input (config, checkpoint, data, CLI): the CLI prints them as one line."""


class UserError(ValueError):
    """Bad input. In a training run every rank raises it alike (the checks run before any work), so
    rank 0 alone says it."""


class RankError(UserError):
    """What one rank met on its own (its disk full during a save): that rank says it."""


# Exit status of a run that stopped on a signal after saving its checkpoint: "temporary failure, run it
# again" (sysexits' EX_TEMPFAIL). The launchers and the slurm script requeue on it.
EXIT_REQUEUE = 75
