"""Errors caused by the user's input (config, checkpoint, data, CLI): the CLI prints them as one line."""


class UserError(ValueError):
    pass
