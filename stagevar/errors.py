"""Errors shown to users: one paragraph that names the file, field or value and how to fix it."""


class StageVarError(Exception):
    """Base class of every error the CLIs print as one paragraph (exit code 1)."""

    exit_code = 1
