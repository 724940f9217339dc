"""The one exception type a user should see as a single line instead of a traceback."""


class ConfigError(ValueError):
    """A bad configuration or input: the message says what is wrong and what would be right."""
