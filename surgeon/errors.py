"""One exception family. Library code raises these; only the CLI prints and exits.

Exit codes: 1 for a failure of the work (bad input file, numerics), 2 for a usage error
(bad option value, out dir exists). The message always names the problem and the fix.
"""


class SurgeonError(Exception):
    """Base of every error surgeon raises on purpose."""

    exit_code = 1


class UsageError(SurgeonError):
    """The command line asks for something impossible (bad rank, unknown method, ...)."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output folder exists and --overwrite was not given."""


class UnsafeOutputError(UsageError):
    """--out names a folder surgeon must not replace (the input, /, home, a folder it did not write)."""


class OutputLockedError(UsageError):
    """Another surgeon process is writing the same --out."""


class DiskSpaceError(SurgeonError):
    """Not enough free space for the planned output, or the disk filled up during the run."""


class SourceError(SurgeonError):
    """The model could not be found, resolved or read."""


class CorruptCheckpointError(SourceError):
    """A shard's header or data is damaged or truncated."""


class UnsupportedTensorError(SurgeonError):
    """A targeted tensor cannot be decomposed (quantized dtype, wrong rank)."""


class PickleRefusedError(SourceError):
    """Only pickled (.bin/.pt) weights were found and --allow-pickle was not given."""


class NumericsError(SurgeonError):
    """A decomposition failed its accuracy check even with the float64 fallback."""


class SplitDirError(SurgeonError):
    """A folder given to absorb/export is not a complete surgeon split."""


class LoadCheckError(SurgeonError):
    """A written adapter does not bind, factor for factor, to the model transformers builds (surgeon/model/check.py)."""


class HostMemoryError(SurgeonError):
    """A command that must hold a whole model in host memory would not fit in what is free (the kernel would kill it)."""


class SourceChangedError(SurgeonError):
    """The source weights a split was made from changed since (absorb into the original refuses)."""


class HubError(SurgeonError):
    """Talking to the Hugging Face Hub failed (network, refused request)."""


class HubAuthError(HubError):
    """No Hugging Face token was found, or the Hub refused it."""


class NotHubReadyError(HubError):
    """A folder fails the checks that come before an upload; the message lists every problem."""


class DistributedError(SurgeonError):
    """The ranks of a torchrun job cannot work together (different views of the files, GPUs)."""


class PeerFailedError(DistributedError):
    """Another rank of a torchrun job failed; the message and exit code are that rank's."""


# what reading a JSON file can raise: cannot read it, not UTF-8, not JSON, nested too deeply for the parser
JSON_READ_ERRORS = (OSError, UnicodeDecodeError, ValueError, RecursionError)
