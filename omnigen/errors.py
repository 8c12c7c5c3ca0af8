"""Errors a user can act on. The CLI prints them as one message and exits 2; nothing else is written."""


class OmnigenError(Exception):
    """Bad input or an impossible request: the message says what is wrong and what is allowed."""


class SpecError(OmnigenError):
    """The spec file (or a --set override) is invalid."""


class PlanError(OmnigenError):
    """No parallel plan satisfies the spec: the message says why and what would fit."""
