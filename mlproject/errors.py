"""The job's narrow exceptions, importable without torch so the CLI can report them cheaply."""

import traceback


class DataError(RuntimeError):
    """The dataset is missing, unreadable or corrupt; the message says which file and what to do."""


class HardwareError(RuntimeError):
    """The config asks for hardware this machine lacks."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""

    checkpoint_logged = False  # set once the run holds the last good epoch's checkpoint


class Preempted(BaseException):
    """SIGTERM or SIGINT arrived: stop, keep a checkpoint, end the run KILLED.

    A BaseException, so that no `except Exception` on the way (Lightning's, a library's) swallows it.
    """

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        self.checkpoint_logged = False  # set once the run holds a checkpoint to resume from
        super().__init__(f"stopped by {signal_name}")


class UserCodeError(RuntimeError):
    """The user's LightningModule or data module broke Lightning's contract during the job (a training_step that
    returns no loss, a data module without a training loader); the message names the class and the fix."""


class TrackingError(RuntimeError):
    """The tracking server cannot be reached or refuses the job's writes."""


class RankStopped(Exception):
    """A rank other than 0, stopped because rank 0 met a mistake before training (rank 0 says what it was)."""


def code_exited(exc: SystemExit) -> str:
    """The one line for code that called sys.exit (or raised SystemExit) inside the job: whatever its code, the job
    did not finish, so it failed. Names where it was called."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" in {frames[-1].name} ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return (
        f"the job's code called sys.exit({exc.code!r}){where} before the job ended: the job failed; raise an "
        "exception to fail it, or set trainer.should_stop to end a fit early"
    )
