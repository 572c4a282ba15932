"""Rate limits per client address on the LTI login and launch and on the teacher actions
(lti_tool/web/rate_limits.py), and what a refused login leaves in Redis: nothing but the counter.

Each test builds its own app from the session's settings with small limits and counts its
requests from addresses no other test uses, so the shared tool's counters are not touched.
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from config.runtime import Runtime
from tests.fakeplatform import FakePlatform

# A window this long never rolls over during a test, so the counts are exact.
LONG_WINDOW_S = 10**6


def _address() -> str:
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def _client(rt: Runtime, **limits: int):  # type: ignore[no-untyped-def]
    from lti_tool.web.app import create_app

    settings = dataclasses.replace(rt.settings, rate_limit_window_s=LONG_WINDOW_S, **limits)
    return create_app(settings).test_client()


def _from(address: str) -> dict[str, dict[str, str]]:
    return {"environ_base": {"REMOTE_ADDR": address}}


def test_logins_past_the_limit_get_429_with_retry_after_and_write_nothing(rt, platform, tool):
    client = _client(rt, login_rate_limit=3)
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    address = _address()
    for _ in range(3):
        assert client.post("/lti/login", data=form, **_from(address)).status_code == 302
    before = set(rt.redis.keys("labpool:lti:*"))

    refused = client.post("/lti/login", data=form, **_from(address))
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= LONG_WINDOW_S
    assert "Too many requests" in refused.get_data(as_text=True)
    assert set(rt.redis.keys("labpool:lti:*")) == before  # no nonce for a refused login

    as_json = client.get(
        "/lti/login", query_string=form, headers={"Accept": "application/json"}, **_from(address)
    )
    assert as_json.status_code == 429
    assert "Too many requests" in as_json.get_json()["error"]
    assert "Retry-After" in as_json.headers


def test_the_limit_is_per_address(rt, platform, tool):
    client = _client(rt, login_rate_limit=2)
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    busy, other = _address(), _address()
    statuses = [client.post("/lti/login", data=form, **_from(busy)).status_code for _ in range(3)]
    assert statuses == [302, 302, 429]
    assert client.post("/lti/login", data=form, **_from(other)).status_code == 302


def test_behind_a_proxy_the_forwarded_address_is_counted(rt, platform, tool):
    """With PROXY_COUNT, students behind one nginx are told apart by X-Forwarded-For."""
    client = _client(rt, login_rate_limit=1, proxy_count=1)
    form = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    nginx = _address()
    first, second = _address(), _address()

    def login(student: str) -> int:
        return client.post(
            "/lti/login", data=form, headers={"X-Forwarded-For": student}, **_from(nginx)
        ).status_code

    assert [login(first), login(second), login(first)] == [302, 302, 429]


def test_launches_past_the_limit_get_429(rt, tool):
    client = _client(rt, launch_rate_limit=2)
    address = _address()
    statuses = [
        client.post(
            "/lti/launch", data={"id_token": "x", "state": "y"}, **_from(address)
        ).status_code
        for _ in range(3)
    ]
    assert statuses == [400, 400, 429]


def test_teacher_actions_past_the_limit_get_429(rt, tool):
    client = _client(rt, teacher_action_rate_limit=2)
    address = _address()
    statuses = [
        client.post("/activities/1/warm-now", data={"csrf": "stale"}, **_from(address)).status_code
        for _ in range(3)
    ]
    assert statuses == [403, 403, 429]  # counted before the CSRF and teacher checks
    # The count is shared by every action of that address, not by other addresses.
    assert client.post("/activities/1/stop-idle", **_from(address)).status_code == 429
    assert client.post("/activities/1/stop-idle", **_from(_address())).status_code == 403


def test_a_limit_of_zero_counts_nothing(rt, tool):
    client = _client(rt, launch_rate_limit=0)
    address = _address()
    for _ in range(5):
        response = client.post(
            "/lti/launch", data={"id_token": "x", "state": "y"}, **_from(address)
        )
        assert response.status_code == 400
    assert not rt.redis.keys(f"labpool:rate:launch:{address}:*")


def test_500_refused_logins_leave_one_counter_in_redis_and_a_valid_one_its_nonce(
    rt, platform, tool
):
    """Anonymous logins that are refused write no state or nonce; only the address's counter
    (one key per window, expiring) remains. A valid login stores its nonce with a TTL."""
    client = _client(rt)  # the default limits: 500 from one address are within them
    address = _address()
    good = platform.login_form(platform.learner(), login_hint="4", lti_message_hint="hint")
    with FakePlatform(tool_url=tool.url, key_namespace="stranger") as stranger:
        unknown_issuer = stranger.login_form(
            stranger.learner(), login_hint="4", lti_message_hint="hint"
        )
    refused_forms = [
        {},
        {"target_link_uri": "https://evil.example/"},
        {**good, "target_link_uri": tool.url + ".evil.example/lti/launch"},
        {**good, "login_hint": ""},
        {**good, "client_id": "not-registered"},
        unknown_issuer,
    ]
    before = set(rt.redis.keys("*"))
    for i in range(500):
        response = client.get(
            "/lti/login", query_string=refused_forms[i % len(refused_forms)], **_from(address)
        )
        assert response.status_code == 400, response.get_data(as_text=True)[:300]
    added = set(rt.redis.keys("*")) - before
    assert [key.decode() for key in added] == [
        f"labpool:rate:login:{address}:{int(time.time()) // LONG_WINDOW_S}"
    ]
    assert 0 < rt.redis.ttl(added.pop()) <= LONG_WINDOW_S

    nonces_before = set(rt.redis.keys("labpool:lti:*"))
    assert client.get("/lti/login", query_string=good, **_from(address)).status_code == 302
    stored = set(rt.redis.keys("labpool:lti:*")) - nonces_before
    assert len(stored) == 1 and 0 < rt.redis.ttl(stored.pop()) <= 600
