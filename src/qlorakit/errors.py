"""The errors qlorakit raises. Each message says what was wrong, where, and what to do."""


class QLoraKitError(Exception):
    """Base class of every error qlorakit raises on purpose."""


class ConfigError(QLoraKitError, ValueError):
    """A parameter, option or field has a value qlorakit cannot use."""


class SourceError(QLoraKitError, ValueError):
    """A model source (directory, file or name) cannot be loaded."""


class PrecisionError(QLoraKitError, ValueError):
    """A dtype, scaler or quantization state breaks the precision policy (DESIGN.md)."""
