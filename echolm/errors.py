"""User-facing errors: the CLI prints these as one line (no traceback) and exits 2."""


class EchoError(Exception):
    """A problem with the user's input (file, line, field, preset ...), not a bug in Echo.

    The message must name what is wrong and where, e.g. ``data.jsonl:17: field 'text' is
    missing``.
    """
