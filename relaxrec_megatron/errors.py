"""Errors caused by the user's input (config, checkpoint, data, CLI): the CLI prints them as one line."""


class UserError(ValueError):
    pass


# Exit status of a run that stopped on a signal after saving its checkpoint: "temporary failure, run it
# again" (sysexits' EX_TEMPFAIL). The launchers and the slurm script requeue on it.
EXIT_REQUEUE = 75
