"""Errors a user can fix. The command line turns them into one line on stderr and exit 2."""


class UserError(Exception):
    """Bad input, missing data or a wrong setting: the message says what and how to fix it."""


class DatasetError(UserError):
    """A data set file or folder is missing, malformed or fails its checksum."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint was written when there is a run dir."""

    def __init__(self, step: int, run_dir=None):
        self.step, self.run_dir = step, run_dir
        where = f"; resume with `mnist-cnn train --resume {run_dir}`" if run_dir else ""
        super().__init__(f"interrupted at step {step}{where}")
