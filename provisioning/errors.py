"""What can go wrong while providing machines, as a small hierarchy the web edge turns into
clear answers once."""


class ProvisioningError(Exception):
    """A machine could not be provided; the message is safe to show a teacher."""


class BackendUnavailable(ProvisioningError):
    """The backend cannot run this kind of machine here (e.g. an IDE that is not installed)."""


class QuotaExceeded(ProvisioningError):
    """The project's quota has no room for one more server (Nova's 403 at create)."""


class CloudConflict(ProvisioningError):
    """The cloud refused because the server is busy with another task (409): retry later."""


class CloudUnavailable(ProvisioningError):
    """The cloud did not answer, or answered 5xx/429: retry with backoff."""
