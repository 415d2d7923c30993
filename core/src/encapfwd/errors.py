"""Exceptions that reach the user as one clear line."""


class EncapfwdError(Exception):
    """Base class: the CLI prints ``str(exc)`` on one line and exits non-zero."""


class ConfigError(EncapfwdError):
    """The configuration or a command's words are invalid."""


class PluginError(EncapfwdError):
    """A plugin is missing, broken, or collides with another."""


class SetupRefused(EncapfwdError):
    """A back-end setup generator cannot produce a working recipe for this case."""


class LiveError(EncapfwdError):
    """A one-line reason why live forwarding cannot start (or why a reload is refused)."""


class InterfaceBusy(LiveError):
    """The interface already has a kernel program that this dispatcher must not replace (another running
    ``encapfwd run``'s, or a program that is not encapfwd's): never a reason to fall back to another engine."""
