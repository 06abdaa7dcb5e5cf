"""Errors shown to users: one paragraph that names the file, field or value and how to fix it."""


class StageVarError(Exception):
    """Base class of every error the CLIs print as one paragraph (exit code 1)."""

    exit_code = 1


def run_command(fn, args, *, interrupted_hint: str = "") -> int:
    """Run a CLI command: a :class:`StageVarError` (and OSError / ValueError from deep inside)
    becomes one paragraph on stderr and its exit code; ``args.debug`` re-raises instead."""
    import sys
    try:
        return fn(args)
    except StageVarError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt:
        print("interrupted" + (f": {interrupted_hint}" if interrupted_hint else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:          # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except (OSError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"error: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
