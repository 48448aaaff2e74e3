"""The errors qlorakit raises. Each message says what was wrong, where, and what to do."""


class QLoraKitError(Exception):
    """Base class of every error qlorakit raises on purpose."""


class ConfigError(QLoraKitError, ValueError):
    """A parameter, option or field has a value qlorakit cannot use."""


class SourceError(QLoraKitError, ValueError):
    """A model source (directory, file or name) cannot be loaded."""


class PrecisionError(QLoraKitError, ValueError):
    """A dtype, scaler or quantization state breaks the precision policy (DESIGN.md)."""


class DataError(QLoraKitError, ValueError):
    """A data file or one of its rows cannot be used; the message names the file, line and field."""


class TrainingError(QLoraKitError, RuntimeError):
    """Training cannot go on (for example a non-finite loss outside fp16); the last good checkpoint is intact."""
