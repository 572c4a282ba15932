"""Registering platforms (manual registration; Moodle shows the values after the admin adds
the tool)."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from config.settings import Settings
from lti_tool.framing import forget_platform_origins
from lti_tool.models import Deployment, Platform


class RegistrationError(Exception):
    """The registration's values are not acceptable; the message says which."""


def _check_url(label: str, url: str, allow_http: bool) -> None:
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.netloc:
        need = "an http(s)" if allow_http else "an https"
        raise RegistrationError(f"{label} must be {need} URL, got {url!r}")


def register_platform(
    session: Session,
    settings: Settings,
    *,
    issuer: str,
    client_id: str,
    deployment_ids: Iterable[str],
    auth_url: str,
    token_url: str,
    jwks_url: str,
    name: str = "",
) -> Platform:
    """Add a platform, or add deployments to an existing (issuer, client id)."""
    allow_http = not settings.is_production
    for label, url in (
        ("issuer", issuer),
        ("auth URL", auth_url),
        ("token URL", token_url),
        ("JWKS URL", jwks_url),
    ):
        _check_url(label, url, allow_http)
    if not client_id.strip():
        raise RegistrationError("client id must not be empty")
    deployment_ids = [d.strip() for d in deployment_ids if d.strip()]
    if not deployment_ids:
        raise RegistrationError("at least one deployment id is needed")

    platform = session.scalars(
        select(Platform).where(Platform.issuer == issuer, Platform.client_id == client_id)
    ).one_or_none()
    if platform is None:
        platform = Platform(issuer=issuer, client_id=client_id, name=name)
        session.add(platform)
    platform.auth_url, platform.token_url, platform.jwks_url = auth_url, token_url, jwks_url
    known = {d.deployment_id for d in platform.deployments}
    for deployment_id in deployment_ids:
        if deployment_id not in known:
            platform.deployments.append(Deployment(deployment_id=deployment_id))
    session.flush()
    forget_platform_origins()  # this process frames the new platform's pages at once
    return platform


def moodle_values(settings: Settings) -> list[tuple[str, str]]:
    return [
        ("Tool URL", settings.url("/lti/launch")),
        ("LTI version", "LTI 1.3"),
        ("Public key type", "Keyset URL"),
        ("Public keyset", settings.url("/lti/jwks.json")),
        ("Initiate login URL", settings.url("/lti/login")),
        ("Redirection URI(s)", settings.url("/lti/launch")),
        # With "Supports Deep Linking (Content-Item Message)" ticked: "Select content".
        ("Content Selection URL", settings.url("/lti/launch")),
    ]
