"""What a Moodle 4.3 launch says, for the fake platform and for tests that build their own:
the LTI claim names, roles and scopes; the id_tokens captured from a real Moodle 4.3
(``tests/fixtures/moodle-4.3``, see the README there); ``moodle_claims``, which re-targets a
captured launch at a fake platform and applies a test's overrides (the launch cases: missing
claims, other roles, no context, other deployments…); and the privacy cases (no name, no email).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import string
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

# --------------------------------------------------------------------------- claim names

_LTI = "https://purl.imsglobal.org/spec/lti/claim/"
MESSAGE_TYPE = _LTI + "message_type"
VERSION = _LTI + "version"
DEPLOYMENT_ID = _LTI + "deployment_id"
TARGET_LINK_URI = _LTI + "target_link_uri"
ROLES = _LTI + "roles"
CONTEXT = _LTI + "context"
RESOURCE_LINK = _LTI + "resource_link"
CUSTOM = _LTI + "custom"
LAUNCH_PRESENTATION = _LTI + "launch_presentation"
AGS = "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint"
NRPS = "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice"
BASIC_OUTCOME = "https://purl.imsglobal.org/spec/lti-bo/claim/basicoutcome"
DL_SETTINGS = "https://purl.imsglobal.org/spec/lti-dl/claim/deep_linking_settings"
DL_CONTENT_ITEMS = "https://purl.imsglobal.org/spec/lti-dl/claim/content_items"

ROLE_LEARNER = "http://purl.imsglobal.org/vocab/lis/v2/membership#Learner"
ROLE_INSTRUCTOR = "http://purl.imsglobal.org/vocab/lis/v2/membership#Instructor"
ROLE_SYSTEM_ADMIN = "http://purl.imsglobal.org/vocab/lis/v2/system/person#Administrator"
ROLE_INSTITUTION_ADMIN = "http://purl.imsglobal.org/vocab/lis/v2/institution/person#Administrator"

#: Moodle signs id_tokens with ``exp = iat + 60`` (mod/lti/locallib.php, lti_sign_jwt).
ID_TOKEN_LIFETIME = 60
#: Moodle's access tokens live ``LTI_ACCESS_TOKEN_LIFE`` = 3600 s.
ACCESS_TOKEN_LIFETIME = 3600

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SCOPE_AGS_LINEITEM = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem"
SCOPE_AGS_LINEITEM_READONLY = "https://purl.imsglobal.org/spec/lti-ags/scope/lineitem.readonly"
SCOPE_AGS_RESULT_READONLY = "https://purl.imsglobal.org/spec/lti-ags/scope/result.readonly"
SCOPE_AGS_SCORE = "https://purl.imsglobal.org/spec/lti-ags/scope/score"
SCOPE_NRPS = "https://purl.imsglobal.org/spec/lti-nrps/scope/contextmembership.readonly"
SCOPE_BASIC_OUTCOME = "https://purl.imsglobal.org/spec/lti-bo/scope/basicoutcome"
#: What a Moodle tool with AGS ("scores and line items"), NRPS and basic outcomes enabled may
#: be granted (``lti_get_permitted_service_scopes``); ``FakePlatform.permitted_scopes``.
MOODLE_SCOPES = (
    SCOPE_AGS_LINEITEM,
    SCOPE_AGS_LINEITEM_READONLY,
    SCOPE_AGS_RESULT_READONLY,
    SCOPE_AGS_SCORE,
    SCOPE_NRPS,
    SCOPE_BASIC_OUTCOME,
)
NRPS_MEDIA_TYPE = "application/vnd.ims.lti-nrps.v2.membershipcontainer+json"
#: The LTI 1.1 JSON-LD format Moodle also serves on the memberships URL (not implemented here).
LIS_MEMBERSHIP_MEDIA_TYPE = "application/vnd.ims.lis.v2.membershipcontainer+json"
_MEMBERSHIP_ROLE_PREFIX = "http://purl.imsglobal.org/vocab/lis/v2/membership#"

_NAME_CLAIMS = ("name", "given_name", "family_name", "middle_name")
#: Top-level claim names accepted verbatim as keyword overrides (anything else must be a full
#: claim URI, or go through ``extra=``), so a typo such as ``contextid=`` fails loudly.
_PLAIN_CLAIMS = frozenset(
    {
        "iss",
        "aud",
        "sub",
        "azp",
        "nonce",
        "iat",
        "exp",
        "nbf",
        "jti",
        "email",
        "locale",
        "picture",
        "middle_name",
        *_NAME_CLAIMS,
    }
)

# --------------------------------------------------------------------------- fixtures


def _find_fixtures_dir() -> Path:
    candidates = [
        os.environ.get("LABPOOL_MOODLE_FIXTURES", ""),
        str(Path(__file__).resolve().parent.parent / "fixtures" / "moodle-4.3"),
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "launch_learner.json").is_file():
            return Path(candidate)
    return Path(candidates[-1])


#: Where the captured Moodle 4.3 messages live ($LABPOOL_MOODLE_FIXTURES,
#: else tests/fixtures/moodle-4.3, in the repository).
FIXTURES_DIR = _find_fixtures_dir()


@functools.cache
def _load_fixture_cached(name: str) -> str:
    path = FIXTURES_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Moodle fixture {path} not found; set LABPOOL_MOODLE_FIXTURES to the folder "
            "holding the captured Moodle 4.3 messages"
        )
    return path.read_text(encoding="utf-8")


def load_fixture(name: str) -> dict[str, Any]:
    """A fresh copy of a captured Moodle 4.3 message, e.g. ``load_fixture("launch_learner.json")``."""
    return json.loads(_load_fixture_cached(name))


DropPath = str | Sequence[str]


def _drop_path(claims: dict[str, Any], path: DropPath) -> None:
    keys = [path] if isinstance(path, str) else list(path)
    target: Any = claims
    for key in keys[:-1]:
        target = target[key]
    if not isinstance(target, dict) or keys[-1] not in target:
        raise KeyError(f"drop={path!r}: no such claim in the id_token")
    del target[keys[-1]]


def _replace_in_strings(value: Any, old: str, new: str) -> Any:
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace_in_strings(item, old, new) for item in value]
    if isinstance(value, dict):
        return {key: _replace_in_strings(item, old, new) for key, item in value.items()}
    return value


# --------------------------------------------------------------------------- claim helpers


def without_name(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without ``name``/``given_name``/``family_name``/``middle_name`` (not shared)."""
    return {key: value for key, value in claims.items() if key not in _NAME_CLAIMS}


def without_email(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy without ``email`` (Moodle sends it only if the admin shares it)."""
    return {key: value for key, value in claims.items() if key != "email"}


def without_personal_data(claims: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with neither name nor email."""
    return without_email(without_name(claims))


def moodle_claims(
    fixture_name: str,
    sub: str,
    overrides: dict[str, Any],
    *,
    issuer: str,
    client_id: str,
    deployment_id: str,
    target_link_uri: str | None,
) -> dict[str, Any]:
    """Moodle's captured claims (``fixture_name``) re-targeted at a platform (``issuer``, the
    tool type's ``client_id`` and ``deployment_id``), then ``overrides`` applied.

    Shortcuts (``None`` drops the claim): ``context_id``, ``context_label``,
    ``context_title``, ``context`` (a dict, or None for a launch without context),
    ``resource_link_id``, ``resource_link_title``, ``roles`` (list or one string),
    ``name`` (also sets given/family name; None drops all names), ``given_name``,
    ``family_name``, ``email``, ``custom``, ``message_type``, ``version``,
    ``deployment_id`` (the claim only), ``lineitem_id`` (None: no line item), ``ags=False``,
    ``nrps=False``, ``dl_settings``, ``extra={claim: value}``. Plain claims (``aud``,
    ``azp``, ``nonce``, ``iat``, ``exp``…) and full claim URIs are set verbatim; an ``iat``
    alone moves ``exp`` to ``iat + 60``. ``nonce`` is left out so the driver fills in the
    tool's; ``target_link_uri`` is the tool's launch URL (None until a tool is known: the
    driver fills it in).
    """
    fixture = load_fixture(fixture_name)["claims"]
    claims: dict[str, Any] = _replace_in_strings(fixture, fixture["iss"], issuer)
    overrides = dict(overrides)
    now = int(time.time())
    claims["iss"] = issuer
    claims["aud"] = client_id
    claims["sub"] = str(sub)
    claims["iat"] = now
    claims["exp"] = now + ID_TOKEN_LIFETIME
    claims.pop("nonce", None)
    claims[DEPLOYMENT_ID] = deployment_id
    claims[TARGET_LINK_URI] = target_link_uri

    def take(name: str) -> tuple[bool, Any]:
        return (name in overrides), overrides.pop(name, None)

    # Personal data: shared only if the Moodle admin allows it.
    given, value = take("name")
    if given:
        if value is None:
            claims = without_name(claims)
        else:
            first, _, rest = str(value).partition(" ")
            claims.update(name=value, given_name=first, family_name=rest)
    for name in ("given_name", "family_name", "email"):
        given, value = take(name)
        if given:
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value

    given, value = take("roles")
    if given:
        if value is None:
            claims.pop(ROLES, None)
        else:
            claims[ROLES] = [value] if isinstance(value, str) else list(value)

    # Course (context) and activity (resource link).
    given, value = take("context")
    if given:
        if value is None:
            claims.pop(CONTEXT, None)
        else:
            claims[CONTEXT] = dict(value)
    for short, key in (
        ("context_id", "id"),
        ("context_label", "label"),
        ("context_title", "title"),
    ):
        given, value = take(short)
        if given:
            context = claims.setdefault(CONTEXT, {"type": ["CourseSection"]})
            if value is None:
                context.pop(key, None)
            else:
                context[key] = str(value)
    if RESOURCE_LINK in claims:
        for short, key in (("resource_link_id", "id"), ("resource_link_title", "title")):
            given, value = take(short)
            if given:
                if value is None:
                    claims[RESOURCE_LINK].pop(key, None)
                else:
                    claims[RESOURCE_LINK][key] = str(value)
    else:
        for short in ("resource_link_id", "resource_link_title"):
            if short in overrides:
                raise TypeError(f"{short}= makes no sense for {fixture_name}")

    given, value = take("custom")
    if given:
        if value is None:
            claims.pop(CUSTOM, None)
        else:
            claims[CUSTOM] = dict(value)

    # Service endpoints follow the course, the tool type (= deployment) and the activity.
    lineitem_given, lineitem_id = take("lineitem_id")
    _moodle_service_urls(
        claims, fixture, lineitem_given, lineitem_id, issuer=issuer, type_id=deployment_id
    )
    _, ags = take("ags")
    if ags is False:
        claims.pop(AGS, None)
    _, nrps = take("nrps")
    if nrps is False:
        claims.pop(NRPS, None)
    given, value = take("dl_settings")
    if given:
        if DL_SETTINGS not in claims:
            raise TypeError(f"dl_settings= makes no sense for {fixture_name}")
        claims[DL_SETTINGS].update(value or {})

    for short, key in (
        ("message_type", MESSAGE_TYPE),
        ("version", VERSION),
        ("deployment_id", DEPLOYMENT_ID),
    ):
        given, value = take(short)
        if given:
            if value is None:
                claims.pop(key, None)
            else:
                claims[key] = value

    _, extra = take("extra")
    verbatim = dict(extra or {})
    for name in list(overrides):
        if name in _PLAIN_CLAIMS or "://" in name:
            verbatim[name] = overrides.pop(name)
    if overrides:
        raise TypeError(f"unknown claim override(s): {sorted(overrides)}")
    if "iat" in verbatim and "exp" not in verbatim and verbatim["iat"] is not None:
        verbatim["exp"] = verbatim["iat"] + ID_TOKEN_LIFETIME
    for name, value in verbatim.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def _moodle_service_urls(
    claims: dict[str, Any],
    fixture: Mapping[str, Any],
    lineitem_given: bool,
    lineitem_id: Any,
    *,
    issuer: str,
    type_id: str,  # Moodle's deployment id is the tool type id
) -> None:
    """Rebuild the URLs Moodle derives from course id, type id and activity instance."""
    services = f"{issuer}/mod/lti/services.php"
    course = str(claims.get(CONTEXT, {}).get("id") or fixture[CONTEXT]["id"])
    memberships = f"{services}/CourseSection/{course}/bindings/{type_id}/memberships"
    if NRPS in claims:
        claims[NRPS]["context_memberships_url"] = memberships
    custom = claims.get(CUSTOM)
    if isinstance(custom, dict):
        if "context_memberships_url" in custom:
            custom["context_memberships_url"] = memberships
        if "context_title" in custom and claims.get(CONTEXT, {}).get("title"):
            custom["context_title"] = claims[CONTEXT]["title"]
    if AGS in claims:
        ags = claims[AGS]
        ags["lineitems"] = f"{services}/{course}/lineitems?type_id={type_id}"
        if lineitem_given and lineitem_id is None:
            ags.pop("lineitem", None)
        elif lineitem_given or "lineitem" in ags:
            if not lineitem_given:
                lineitem_id = ags["lineitem"].split("/lineitems/")[1].split("/")[0]
            ags["lineitem"] = (
                f"{services}/{course}/lineitems/{lineitem_id}/lineitem?type_id={type_id}"
            )
    elif lineitem_given:
        raise TypeError("lineitem_id= needs the AGS claim")
    if DL_SETTINGS in claims:
        sesskey = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(10))
        claims[DL_SETTINGS]["deep_link_return_url"] = (
            f"{issuer}/mod/lti/contentitem_return.php?"
            + urlencode({"course": course, "id": type_id, "sesskey": sesskey})
        )
    presentation = claims.get(LAUNCH_PRESENTATION)
    if isinstance(presentation, dict) and "return_url" in presentation:
        instance = str(claims.get(RESOURCE_LINK, {}).get("id", "1"))
        sesskey = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(10))
        presentation["return_url"] = f"{issuer}/mod/lti/return.php?" + urlencode(
            {
                "course": course,
                "launch_container": 4,
                "instanceid": instance,
                "sesskey": sesskey,
            }
        )
