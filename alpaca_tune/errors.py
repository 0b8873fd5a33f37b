"""The one base class for mistakes a user can fix (bad data, settings, files).

Entry points catch it and print its message (no traceback) with a non-zero exit; anything else
is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Input the user gave cannot be used; the message names it, says what is wrong and the fix."""
