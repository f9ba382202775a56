"""One exception family: every message says what is wrong and what to do.

The command line turns each into one line on stderr and an exit status (:data:`EXIT_STATUS`).
"""


class VTVCError(Exception):
    """Base class of all errors raised on purpose by vtvc_pyro."""


class ConfigError(VTVCError):
    """An option or hyperparameter has an invalid value."""


class DataError(VTVCError):
    """A data set spec, root or split is unusable."""


class BankError(VTVCError):
    """A task vector or bank file is missing, corrupt or does not match the base model."""


class BackboneError(VTVCError):
    """A CLIP backbone cannot be built or its weights cannot be found."""


class NumericalError(VTVCError):
    """The loss or its gradients became NaN or Inf."""


class FitInterrupted(VTVCError):
    """A fit stopped on SIGINT/SIGTERM after writing its checkpoint.

    Attributes:
        signal_name: ``SIGINT`` or ``SIGTERM``; the command exits with 130 or 143 (128 + the signal),
            so that a scheduler can tell a preemption (requeue with ``--resume``) from bad input (2).
    """

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name

    @property
    def exit_status(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


EXIT_STATUS = {
    0: "success",
    1: "an unexpected internal error (a bug: the traceback is printed; please report it)",
    2: "bad input or a refused request (a setting, a file, a folder): one line says what to do",
    74: "an I/O error (disk full, permission denied, a file that vanished): one line names the file",
    130: "interrupted by SIGINT (Ctrl-C); a fit wrote its checkpoint: continue with --resume",
    143: "terminated by SIGTERM (e.g. a scheduler's preemption); a fit wrote its checkpoint: continue with --resume",
}
"""The exit statuses of the ``vtvc`` command (and of ``scripts/*.py``)."""
