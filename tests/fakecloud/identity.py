"""Keystone v3 subset: version discovery and ``POST /v3/auth/tokens``.

Mimics the Identity API v3 (https://docs.openstack.org/api-ref/identity/v3/): password
auth scoped to a project, and ``application_credential`` auth (by id, or by name + user).
"""

from __future__ import annotations

import uuid
from typing import Any

from werkzeug.wrappers import Request

from .replies import Reply, json_reply
from .state import ApiError, CloudState, Token, iso

UNAUTHORIZED = "The request you have made requires authentication."


def _v3_version(base: str) -> dict[str, Any]:
    return {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": f"{base}/identity/v3/"}],
        "media-types": [
            {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
        ],
    }


def versions(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /identity``: Keystone's multiple-choice version list (300)."""
    return json_reply({"versions": {"values": [_v3_version(base)]}}, 300)


def version(state: CloudState, req: Request, base: str) -> Reply:
    """``GET /identity/v3``: the v3 version document."""
    return json_reply({"version": _v3_version(base)})


def _check_password(state: CloudState, identity: dict[str, Any], scope: Any) -> None:
    cfg = state.config
    user = (identity.get("password") or {}).get("user") or {}
    name_ok = user.get("name") == cfg.username or user.get("id") == cfg.user_id
    domain = user.get("domain") or {}
    domain_ok = (
        "id" in user or domain.get("name") == cfg.domain_name or domain.get("id") == cfg.domain_id
    )
    if not (name_ok and domain_ok and user.get("password") == cfg.password):
        raise ApiError(401, "error", UNAUTHORIZED)
    project = (scope or {}).get("project") if isinstance(scope, dict) else None
    if not project:
        # An unscoped token has no catalog; openstacksdk always scopes to a project.
        raise ApiError(401, "error", "This fake cloud only issues project-scoped tokens.")
    if not (project.get("id") == cfg.project_id or project.get("name") == cfg.project_name):
        raise ApiError(401, "error", UNAUTHORIZED)


def _check_app_credential(state: CloudState, identity: dict[str, Any]) -> None:
    cfg = state.config
    cred = identity.get("application_credential") or {}
    if "id" in cred:
        ok = cred["id"] == cfg.app_credential_id
    else:
        user = cred.get("user") or {}
        ok = cred.get("name") == cfg.app_credential_name and (
            user.get("id") == cfg.user_id or user.get("name") == cfg.username
        )
    if not (ok and cred.get("secret") == cfg.app_credential_secret):
        raise ApiError(401, "error", UNAUTHORIZED)


def _catalog(state: CloudState, base: str) -> list[dict[str, Any]]:
    region = state.config.region

    def service(stype: str, name: str, url: str) -> dict[str, Any]:
        return {
            "type": stype,
            "name": name,
            "id": uuid.uuid5(uuid.NAMESPACE_URL, stype).hex,
            "endpoints": [
                {
                    "id": uuid.uuid5(uuid.NAMESPACE_URL, url).hex,
                    "interface": "public",
                    "region": region,
                    "region_id": region,
                    "url": url,
                }
            ],
        }

    volume_url = f"{base}/volume/v3/{state.config.project_id}"
    return [
        service("compute", "nova", f"{base}/compute/v2.1"),
        service("identity", "keystone", f"{base}/identity"),
        service("network", "neutron", f"{base}/networking"),
        service("block-storage", "cinder", volume_url),
        service("volumev3", "cinderv3", volume_url),
    ]


def _token_body(state: CloudState, token: Token, base: str, app_cred: bool) -> dict[str, Any]:
    cfg = state.config
    domain = {"id": cfg.domain_id, "name": cfg.domain_name}
    body: dict[str, Any] = {
        "methods": token.methods,
        "user": {
            "id": cfg.user_id,
            "name": cfg.username,
            "domain": domain,
            "password_expires_at": None,
        },
        "audit_ids": [uuid.uuid4().hex[:22]],
        "expires_at": iso(token.expires_at, "keystone"),
        "issued_at": iso(state.now(), "keystone"),
        "project": {"id": cfg.project_id, "name": cfg.project_name, "domain": domain},
        "is_domain": False,
        "roles": [
            {"id": "9fe2ff9ee4384b1894a90878d3e92bab", "name": "member"},
            {"id": "b7c8d9e0f1a2435b8c7d6e5f4a3b2c1d", "name": "reader"},
        ],
        "catalog": _catalog(state, base),
    }
    if app_cred:
        body["application_credential"] = {
            "id": cfg.app_credential_id,
            "name": cfg.app_credential_name,
            "restricted": True,
        }
    return {"token": body}


def issue_token(state: CloudState, req: Request, base: str) -> Reply:
    """``POST /identity/v3/auth/tokens``: 201, token id in ``X-Subject-Token``."""
    payload = req.get_json(silent=True) or {}
    auth = payload.get("auth") or {}
    identity = auth.get("identity") or {}
    methods = identity.get("methods") or []
    if methods == ["password"]:
        _check_password(state, identity, auth.get("scope"))
    elif methods == ["application_credential"]:
        _check_app_credential(state, identity)
    else:
        raise ApiError(401, "error", f"Unsupported auth methods {methods!r}")
    token_id, token = state.issue_token(methods)
    body = _token_body(state, token, base, app_cred=methods == ["application_credential"])
    return json_reply(body, 201, {"X-Subject-Token": token_id})
