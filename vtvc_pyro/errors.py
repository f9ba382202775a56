"""One exception family: every message says what is wrong and what to do."""


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
    """A fit stopped on SIGINT/SIGTERM after writing its checkpoint."""
