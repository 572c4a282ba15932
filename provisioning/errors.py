"""What can go wrong while providing machines, as a small hierarchy the web edge turns into
clear answers once."""


class ProvisioningError(Exception):
    """A machine could not be provided; the message is safe to show a teacher."""


class BackendUnavailable(ProvisioningError):
    """The backend cannot run this kind of machine here (e.g. an IDE that is not installed)."""


class MachineStartFailed(ProvisioningError):
    """The machine was started but its IDE never answered."""
