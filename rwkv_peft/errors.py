"""User-facing errors.

Every problem a user can fix (a bad file, key, flag or value) is raised as `RWKVPeftError`
with a one-line message naming the thing and what to do. Command-line entry points print
that line and exit non-zero instead of showing a traceback.
"""


class RWKVPeftError(Exception):
    """A problem with the user's input, explained in one line."""
