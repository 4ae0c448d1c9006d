"""Errors a user can fix. The command line turns them into one line on stderr and exit 2."""


class UserError(Exception):
    """Bad input, missing data or a wrong setting: the message says what and how to fix it."""


class DatasetError(UserError):
    """A data set file or folder is missing, malformed or fails its checksum."""
