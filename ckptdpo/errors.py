"""Errors a user can cause. The CLI prints their message (one sentence naming the thing and the fix) and exits 2."""


class UserError(Exception):
    """Bad input from the user: a recipe, a file, a model reference, a column name."""
