class UserError(Exception):
    """Bad input or a fault the user can fix: printed as one line, no traceback, exit 1."""
