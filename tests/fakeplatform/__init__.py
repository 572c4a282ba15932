"""A fake LTI 1.3 platform — a test double of Moodle 4.3 — for Labpool's tests.

``FakePlatform`` runs a real HTTP server on loopback that mimics Moodle 4.3's ``mod/lti``
endpoints:

* ``GET /mod/lti/certs.php`` — the platform's public keyset (JWKS), like Moodle's certs.php;
* ``GET|POST /mod/lti/auth.php`` — the OIDC authorization endpoint. Its checks follow Moodle's
  ``mod/lti/auth.php`` (scope, response_type, client_id, registered redirect_uri, response_mode,
  prompt, the single-use ``lti_message_hint``, ``login_hint`` = the launching user) and it
  answers, like Moodle, an HTML page with an auto-submitting ``ltiAuthForm`` that POSTs
  ``id_token`` and ``state`` to the tool's ``redirect_uri``. Unlike Moodle, every refusal is a
  400 with a JSON reason (Moodle posts some errors back to the tool), so tests fail loudly;
* ``POST /mod/lti/token.php`` — OAuth 2 ``client_credentials`` with a ``private_key_jwt``
  client assertion, as in Moodle's ``mod/lti/token.php``: the assertion is checked against the
  tool's JWKS (``tool_jwks_url``, fetched and cached like Moodle's ``lti_verify_with_keyset``:
  any failure with the cached keyset refetches it once), the requested scopes are intersected
  with the permitted ones, and a Bearer token living 3600 s is issued, bound to the tool type
  of the client id that asked (a token used on another tool type's service URL gets 401, as in
  Moodle's ``get_oauth_key_from_headers``). ``add_tool_type()`` adds a second tool type (own
  client id and type id) on the same site, as an admin who configures the tool twice does;
* ``…/services.php/<course>/lineitems…`` — Assignment and Grade Services (line items and
  scores with Moodle's 400/409 rules, a gradebook a test reads, outage switches):
  ``platform.gradebook``, in ``ags.py``;
* ``GET /mod/lti/services.php/CourseSection/<course>/bindings/<type id>/memberships`` — the
  Names and Role Provisioning Service (``mod/lti/service/memberships``) over the rosters that
  tests set with ``set_roster``; pages only when ``limit`` is given, the next page in a
  ``Link: <…?limit=L&from=N>; rel="next"`` header;
* ``GET /mod/lti/openid-configuration.php`` and ``POST /mod/lti/openid-registration.php`` —
  LTI Dynamic Registration as Moodle does it (the captured configuration, registration_helper's
  checks, a single-use registration token, a pending tool type until ``activate()``):
  ``platform.dynamic_registration``, in ``registration.py``;
* ``POST /mod/lti/contentitem_return.php`` — where a tool posts its LtiDeepLinkingResponse
  (form field ``JWT``, the ``deep_link_return_url`` of ``deep_linking()`` claims), checked as
  Moodle's ``lti_convert_from_jwt`` does plus the spec's claims; every response is kept in
  ``deep_link_responses``.

The messages are not invented. Claims start from the id_tokens captured from a real Moodle 4.3
in ``tests/fixtures/moodle-4.3/`` (``launch_learner.json``, ``launch_instructor.json``,
``launch_deep_linking.json``; the login form from ``login_initiation.json``; see the README.md
there) and are re-signed with the fake's own RSA key after substituting ``iss``, ``aud`` (a plain
string, as Moodle sends it), ``deployment_id``, ``sub``, ``nonce``, ``iat``, ``exp = iat + 60``
and ``target_link_uri``. Background on Moodle's behaviour: ``docs/moodle.md``.

``FakePlatform.launch()`` drives the whole exchange the way a browser would, with one
``requests.Session``: POST the login initiation form to ``<tool>/lti/login`` → follow the tool's
302 to the fake's auth.php over HTTP (so its validation runs, and the tool's ``nonce`` ends up in
the id_token) → POST the auto-submitted form to the tool's launch URL. Keyword hooks produce the
certification cases (missing claims, wrong/missing ``kid``, ``alg`` confusion, unsigned tokens,
foreign keys, wrong state, missing state cookie, nonce replay, key rotation).

Example::

    with ServedApp(create_app()) as tool, FakePlatform(tool_url=tool.url) as platform, \
            requests.Session() as browser:
        register_in_tool(**platform.platform_add_args())   # the tool's own registration step
        result = platform.launch(browser, tool.url, platform.learner())
        assert result.launch_response.status_code == 200
        assert platform.replay(browser, tool.url, result).status_code >= 400  # nonce replay

The package: ``platform.py`` (``FakePlatform``, its endpoints and launch driver), ``server.py``
(``ServedApp``, which also serves the tool under test), ``claims.py`` (claim names, the captured
Moodle launches and the claims builder behind ``learner()``/``instructor()``/``deep_linking()``),
``jwt.py`` (keys, JWKs, hand-built JWS), ``ags.py`` (``FakeGradebook``: Moodle's grade services),
``registration.py`` (``FakeDynamicRegistration``: Moodle's side of dynamic registration). Import from the package: ``from tests.fakeplatform
import FakePlatform, ServedApp``.
"""

from typing import Any

from .claims import (
    ACCESS_TOKEN_LIFETIME,
    AGS,
    BASIC_OUTCOME,
    CLIENT_ASSERTION_TYPE,
    CONTEXT,
    CUSTOM,
    DEPLOYMENT_ID,
    DL_SETTINGS,
    FIXTURES_DIR,
    ID_TOKEN_LIFETIME,
    LIS_MEMBERSHIP_MEDIA_TYPE,
    MESSAGE_TYPE,
    MOODLE_SCOPES,
    NRPS,
    NRPS_MEDIA_TYPE,
    RESOURCE_LINK,
    ROLE_INSTITUTION_ADMIN,
    ROLE_INSTRUCTOR,
    ROLE_LEARNER,
    ROLE_SYSTEM_ADMIN,
    ROLES,
    SCOPE_AGS_LINEITEM,
    SCOPE_AGS_LINEITEM_READONLY,
    SCOPE_AGS_RESULT_READONLY,
    SCOPE_AGS_SCORE,
    SCOPE_BASIC_OUTCOME,
    SCOPE_NRPS,
    TARGET_LINK_URI,
    VERSION,
    load_fixture,
    without_email,
    without_name,
    without_personal_data,
)
from .jwt import SigningKey, encode_jwt, foreign_private_key, jwk_thumbprint, tool_public_jwk
from .platform import (
    FakePlatform,
    FakePlatformError,
    IssuedToken,
    LaunchResult,
    parse_auto_submit_form,
)
from .server import ServedApp

__all__ = [
    "ACCESS_TOKEN_LIFETIME",
    "AGS",
    "BASIC_OUTCOME",
    "CLIENT_ASSERTION_TYPE",
    "CONTEXT",
    "CUSTOM",
    "DEPLOYMENT_ID",
    "DL_SETTINGS",
    "FIXTURES_DIR",
    "ID_TOKEN_LIFETIME",
    "MESSAGE_TYPE",
    "NRPS",
    "RESOURCE_LINK",
    "ROLES",
    "ROLE_INSTITUTION_ADMIN",
    "ROLE_INSTRUCTOR",
    "ROLE_LEARNER",
    "ROLE_SYSTEM_ADMIN",
    "SCOPE_AGS_LINEITEM",
    "SCOPE_AGS_LINEITEM_READONLY",
    "SCOPE_AGS_RESULT_READONLY",
    "SCOPE_AGS_SCORE",
    "SCOPE_BASIC_OUTCOME",
    "SCOPE_NRPS",
    "TARGET_LINK_URI",
    "VERSION",
    "FakePlatform",
    "FakePlatformError",
    "IssuedToken",
    "LIS_MEMBERSHIP_MEDIA_TYPE",
    "LaunchResult",
    "MOODLE_SCOPES",
    "NRPS_MEDIA_TYPE",
    "ServedApp",
    "SigningKey",
    "encode_jwt",
    "foreign_private_key",
    "jwk_thumbprint",
    "load_fixture",
    "parse_auto_submit_form",
    "register_fake_platform",
    "tool_public_jwk",
    "without_email",
    "without_name",
    "without_personal_data",
]


def register_fake_platform(rt: Any, fake: FakePlatform) -> dict[str, str]:
    """What an admin's `labpool platform add` does for this fake Moodle (or tool type), in
    the Labpool runtime `rt`; returns the values it registered (`platform_add_args`)."""
    from config.db import transaction
    from lti_tool.registrations import register_platform

    args = fake.platform_add_args()
    with transaction(rt.sessions) as session:
        register_platform(
            session,
            rt.settings,
            issuer=args["issuer"],
            client_id=args["client_id"],
            deployment_ids=[args["deployment_id"]],
            auth_url=args["auth_url"],
            token_url=args["token_url"],
            jwks_url=args["jwks_url"],
        )
    return args
