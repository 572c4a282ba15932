"""Bad input never gets a 500 (issue 15, item 3): property-based fuzzing (hypothesis) of every
route of the tool's web app, listed from `app.url_map` here (a new route is fuzzed at once,
and fails `test_every_route_is_described` until ROUTES says which form fields, query
arguments and headers it reads).

Each request goes as nobody, a student, a teacher, an administrator, with a forged session
cookie or one signed with another key; with the session's CSRF token, a wrong one or none;
with garbage (and the route's own field names with garbage, and some huge) in the form, the
query string and the headers; path ids that exist in the world the test built (an activity,
an assignment, a machine, a student …) or not. Every answer must be below 500; a 4xx must
carry a readable message (an HTML page with words, or JSON `{"error": …}`; never a
traceback), and must have written nothing: the row count of every table, and no new Redis key
but the rate counters and the platform's JWKS cache. (A request that is accepted may write:
a teacher with a valid CSRF token who posts "warm now" does warm.)

The launch and the login are fuzzed on their own as well: garbage and forged id_tokens
(other keys, wrong claims, random headers), random state and state cookies, random login
parameters, and end-to-end through the fake Moodle and the live tool: a real, signed launch
with one claim replaced by random JSON.

The default run keeps `max_examples` modest; `LABPOOL_FUZZ_DEEP=1` (or CI=true) runs the
`slow` deep run (hundreds of examples per route, a few minutes).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, example, given, seed, settings
from hypothesis import strategies as st
from sqlalchemy import String, func, inspect, select, text, update
from werkzeug.routing import IntegerConverter

from config.db import transaction
from lti_tool.admin import make_admin_token
from lti_tool.ide_access import IDE_COOKIE, PROXY_HEADER
from tests.conftest import in_ci
from tests.fakeplatform.jwt import encode_jwt, foreign_private_key

DEEP = os.environ.get("LABPOOL_FUZZ_DEEP") == "1" or in_ci()
PER_ROUTE = int(
    os.environ.get("LABPOOL_FUZZ_EXAMPLES", "10")
)  # examples per route in the default run
PER_ROUTE_DEEP = 300
FUZZ_SETTINGS = dict(
    deadline=None,
    # CI explores the same examples every run (a red CI is then a regression, never a new
    # random find that blocks an unrelated change); developers' runs explore new ones.
    derandomize=in_ci(),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

# ------------------------------------------------------------------ what each route reads

NO_FIELDS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Route:
    form: tuple[str, ...] = NO_FIELDS
    args: tuple[str, ...] = NO_FIELDS
    upload: bool = False


SCHEDULE = ("weekday", "starts", "ends", "timezone", "lead_minutes")
ENV_FIELDS = (
    "name",
    "backend",
    "ide_kind",
    "image_id",
    "flavor_id",
    "network_id",
    "idle_timeout_s",
    "warm_target",
    "max_size",
    "memory_mb",
    "max_processes",
    "max_open_files",
    "max_file_size_mb",
    "cpu_seconds",
)
ROUTES: dict[str, Route] = {
    "home": Route(),
    "healthz": Route(),
    "static": Route(),
    "lti.login": Route(
        form=(
            "iss",
            "login_hint",
            "target_link_uri",
            "lti_message_hint",
            "client_id",
            "lti_deployment_id",
        ),
        args=("iss", "login_hint", "target_link_uri", "lti_message_hint", "client_id"),
    ),
    "lti.launch": Route(form=("id_token", "state")),
    "lti.jwks": Route(),
    "registration.register": Route(args=("openid_configuration", "registration_token")),
    "deep_link.selection_page": Route(),
    "deep_link.choose": Route(
        form=("csrf", "environment_id", "assignment_id", "score_maximum", "title", "text")
    ),
    "deep_link.cancel": Route(form=("csrf",)),
    "machines.status_page": Route(),
    "machines.start_again": Route(form=("csrf",)),
    "machines.machine_state": Route(),
    "machines.open_ide": Route(),
    "proxy.auth": Route(),
    "teacher.class_page": Route(),
    "teacher.class_state": Route(),
    "teacher_actions.my_machine": Route(form=("csrf",)),
    "teacher_actions.choose_environment": Route(form=("csrf", "environment_id")),
    "teacher_actions.warm_now": Route(form=("csrf",)),
    "teacher_actions.stop_idle": Route(form=("csrf",)),
    "teacher_actions.reset_machine": Route(form=("csrf",)),
    "teacher_actions.roster_sync": Route(form=("csrf",)),
    "teacher_actions.add_class_session": Route(form=("csrf", *SCHEDULE)),
    "teacher_actions.delete_class_session": Route(form=("csrf",)),
    "grading.create_assignment": Route(
        form=(
            "csrf",
            "name",
            "title",
            "max_score",
            "due_at",
            "late_policy",
            "git_url",
            "git_branch",
            "git_folder",
        ),
        upload=True,
    ),
    "grading.assignment_page": Route(),
    "grading.enter_grade": Route(form=("csrf", "score", "comment")),
    "grading.resend_grade": Route(form=("csrf",)),
    "grading.my_work": Route(),
    "release.replace_files": Route(
        form=("csrf", "git_url", "git_branch", "git_folder"), upload=True
    ),
    "release.fetch_again": Route(form=("csrf",)),
    "release.publish_assignment": Route(form=("csrf",)),
    "release.release_to_class": Route(form=("csrf",)),
    "submissions.my_submission": Route(),
    "submissions.submit": Route(form=("csrf",)),
    "submissions.collect_now": Route(form=("csrf",)),
    "submissions.collect_progress": Route(),
    "submissions.class_submissions": Route(),
    "submissions.download": Route(),
    "autograde.grade_all": Route(form=("csrf",)),
    "autograde.regrade": Route(form=("csrf",)),
    "autograde.auto_grade_setting": Route(form=("csrf", "on")),
    "autograde.feedback": Route(),
    "home_view.files": Route(args=("path", "kind")),
    "home_view.rendered": Route(args=("path",)),
    "admin.page": Route(),
    "admin.open_token": Route(),
    "admin.disable_platform": Route(form=("csrf",)),
    "admin.enable_platform": Route(form=("csrf",)),
    "admin.confirm_removal": Route(),
    "admin.remove": Route(form=("csrf", "confirm", "force")),
    "admin.rotate": Route(form=("csrf",)),
    "admin.registration_link": Route(form=("csrf",)),
    "admin.add_environment": Route(form=("csrf", *ENV_FIELDS)),
    "admin.environment_form": Route(),
    "admin.edit": Route(form=("csrf", *ENV_FIELDS)),
    "admin.retire": Route(form=("csrf", "retired")),
    "admin.environment_courses": Route(form=("csrf", "access", "course_id")),
    "admin.send_again": Route(form=("csrf",)),
    "ops.metrics_page": Route(),
    "ops.readyz": Route(),
}
# Answers that are nginx's contract, not a person's page: /proxy/auth says 401/403 with an
# empty body (nginx turns them into the hand-over page or its own 403).
BARE_4XX = {"proxy.auth"}
# Redis keys a refused request may leave: the per-address counters and the platform's key
# cache (a forged launch naming a registered issuer may fetch its JWKS once per 10 s).
HARMLESS_KEYS = re.compile(rb"^labpool:(rate:|platform-jwks:)")

# ------------------------------------------------------------------ strategies

TRICKY = [
    "",
    " ",
    "0",
    "1",
    "-1",
    "1.5",
    "1e309",
    "-1e309",
    "nan",
    "inf",
    "99999999999999999999999999",
    "9223372036854775808",
    "2147483648",
    "٣",
    "2026-13-45T99:99",
    "2026-12-24T18:00",
    "9999-12-31T23:59:59+14:00",
    "0001-01-01T00:00-23:59",
    "24:00",
    "09:30",
    "23:59:59.999999",
    "Europe/Nowhere",
    "../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "\ud800",
    "<script>alert(1)</script>",
    "remove",
    "https://127.0.0.1:9/repo.git",
    "https://[::1",
    "file:///etc/passwd",
    "http://",
    "%00",
    "{}",
    "[]",
    "null",
]
# Surrogates cannot travel in a form; everything else may.
chars = st.characters(blacklist_categories=("Cs",))
field_value = st.one_of(
    st.sampled_from(TRICKY).filter(lambda v: "\ud800" not in v),
    st.text(chars, max_size=40),
    st.integers().map(str),
    st.floats().map(str),
    st.text(chars, min_size=1000, max_size=3000),
)
HUGE = "x" * (300 * 1024)  # more than the app's 256 KB body limit
field_name = st.one_of(st.text(chars, min_size=1, max_size=12), st.sampled_from(TRICKY[4:20]))
huge_ids = st.integers(min_value=10**6, max_value=2**80)


def ids_for(world: dict[str, int], name: str) -> st.SearchStrategy[int]:
    """A path's integer: one of the world's ids (any kind: ids of the wrong kind too), 0, or
    one far beyond any row (never a small id: the session's registered platform and the
    default environment must not be disabled or edited by the fuzzing)."""
    real = sorted(set(world.values()))
    own = [world[name]] if name in world else []
    mine = st.sampled_from(own or real)
    return st.one_of(mine, mine, mine, st.sampled_from(real), st.just(0), huge_ids)


def forms_for(route: Route) -> st.SearchStrategy[dict[str, str]]:
    known = st.dictionaries(st.sampled_from(route.form or ("x",)), field_value, max_size=8)
    extra = st.dictionaries(field_name, field_value, max_size=3)
    return st.builds(lambda a, b: {**b, **a}, known, extra)


def args_for(route: Route) -> st.SearchStrategy[dict[str, str]]:
    known = st.dictionaries(st.sampled_from(route.args or ("q",)), field_value, max_size=4)
    return st.builds(
        lambda a, b: {**b, **a}, known, st.dictionaries(field_name, field_value, max_size=2)
    )


# What a header can carry (WSGI decodes its bytes as Latin-1).
latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f\x85")
header_value = st.one_of(
    st.sampled_from(
        [
            "",
            "cross-site",
            "same-origin",
            "POST",
            "websocket",
            "/ide/1/lab",
            "/ide/99999999999999999999999/",
            "http://127.0.0.1",
            "null",
            "Bearer x",
            "application/json",
        ]
    ),
    st.text(latin1, max_size=60),
)
HEADER_NAMES = [
    PROXY_HEADER,
    "X-Original-URI",
    "X-Original-Method",
    "X-Original-Upgrade",
    "Upgrade",
    "Origin",
    "Sec-Fetch-Site",
    "Sec-Fetch-Dest",
    "Authorization",
    "X-Request-ID",
    "X-Forwarded-For",
    "Content-Type",
]
headers = st.dictionaries(st.sampled_from(HEADER_NAMES), header_value, max_size=5)
IDENTITIES = ["nobody", "student", "teacher", "admin", "forged", "other-key"]
# Whose session the route is for: mostly that one (to get past its door), any other too.
STUDENT_ROUTES = {
    "machines.status_page",
    "machines.start_again",
    "machines.machine_state",
    "machines.open_ide",
    "grading.my_work",
    "submissions.my_submission",
    "submissions.submit",
    "autograde.feedback",
}


def identities(endpoint: str) -> st.SearchStrategy[str]:
    usual = (
        "admin"
        if endpoint.startswith("admin.")
        else "student"
        if endpoint in STUDENT_ROUTES
        else "teacher"
    )
    return st.one_of(st.just(usual), st.just(usual), st.sampled_from(IDENTITIES))


csrf_choices = st.sampled_from(["valid", "valid", "none", "wrong"])
accepts = st.sampled_from([None, "application/json", "text/html", "*/*"])


# ------------------------------------------------------------------ the world


@pytest.fixture(scope="module")
def fuzz_app(rt):  # type: ignore[no-untyped-def]
    """Our app (create_app) on the session's database and Redis, with the per-address limits
    off (they would answer every fuzzed request with a 429 after the first hundred)."""
    from lti_tool.web.app import create_app

    quiet = dataclasses.replace(
        rt.settings, login_rate_limit=0, launch_rate_limit=0, teacher_action_rate_limit=0
    )
    return create_app(quiet)


@pytest.fixture
def world(rt, tool, platform, browser, fuzz_app) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """A course as a class has it: a teacher's and a student's launch (through the fake
    Moodle, into the live tool), an assignment, the student's machine; an admin session
    (from an admin token); a second platform and an environment of the test's own that the
    fuzzed admin actions may disable, remove, retire and edit."""
    from lti_tool.models import Activity, Platform
    from lti_tool.registrations import register_platform
    from provisioning.environments import add_environment
    from provisioning.models import Environment

    teacher = platform.launch(browser, tool.url, platform.instructor(sub="3")).launch_response
    assert teacher.status_code == 303, teacher.text[:300]
    activity_id = int(teacher.headers["Location"].split("/activities/")[1].split("/")[0])
    student_browser = requests.Session()
    student = platform.launch(student_browser, tool.url, platform.learner(sub="4")).launch_response
    assert student.status_code == 303, student.text[:300]
    machine_id = int(student.headers["Location"].rsplit("/", 1)[1])
    class_page = browser.get(f"{tool.url}/activities/{activity_id}/class").text
    csrf = class_page.split('name="csrf" value="')[1].split('"')[0]
    created = browser.post(
        f"{tool.url}/activities/{activity_id}/assignments",
        data={"csrf": csrf, "name": "lab1", "max_score": "10"},
        allow_redirects=False,
    )
    assert created.status_code == 303, created.text[:300]
    with transaction(rt.sessions) as session:
        spare = register_platform(
            session,
            rt.settings,
            issuer="https://fuzz-spare.example",
            client_id="spare",
            deployment_ids=["1"],
            auth_url="https://fuzz-spare.example/auth",
            token_url="https://fuzz-spare.example/token",
            jwks_url="https://fuzz-spare.example/certs",
        )
        spare_id = spare.id
        env = add_environment(session, name="fuzz-env", backend="local")
        session.flush()
        env_id = env.id
    with rt.sessions() as session:
        activity = session.get_one(Activity, activity_id)
        from grading.models import Assignment

        assignment_id = session.scalars(
            select(Assignment.id).where(Assignment.activity_id == activity_id)
        ).one()
        course_id = activity.course_id
        from provisioning.models import Machine

        student_id = session.get_one(Machine, machine_id).owner_id
        teacher_id = session.scalars(
            text(
                "SELECT user_id FROM enrolments WHERE course_id = :c AND user_id <> :s"
            ).bindparams(c=course_id, s=student_id)
        ).first()
    client = fuzz_app.test_client()
    admin_token = make_admin_token(rt.settings, 600)
    opened = client.get(f"/admin/token/{admin_token}")
    assert opened.status_code == 303, opened.get_data(as_text=True)[:300]
    admin_cookie = client.get_cookie("labpool_session").value
    serializer = fuzz_app.session_interface.get_signing_serializer(fuzz_app)
    cookies = {
        "teacher": browser.cookies["labpool_session"],
        "student": student_browser.cookies["labpool_session"],
        "admin": admin_cookie,
    }
    ids = {
        "activity_id": activity_id,
        "assignment_id": assignment_id,
        "course_id": course_id,
        "machine_id": machine_id,
        "user_id": student_id,
        "student_id": student_id,
        "teacher_id": teacher_id,
        "platform_id": spare_id,
        "environment_id": env_id,
    }
    from lti_tool.registration_links import RegistrationLinks

    yield {
        "ids": ids,
        # A real one-time registration link (the exchange then fails on the platform's side).
        "tokens": {"registration.register": RegistrationLinks(rt.redis).create(3600).token},
        "cookies": cookies,
        "csrf": {who: serializer.loads(c)["csrf"] for who, c in cookies.items()},
    }
    with transaction(rt.sessions) as session:
        session.execute(update(Platform).where(Platform.id != spare_id).values(disabled_at=None))
        session.execute(
            update(Environment).where(Environment.name == "default").values(retired_at=None)
        )
        spare = session.get(Platform, spare_id)
        if spare is not None:
            from lti_tool.registrations import remove_platform

            remove_platform(session, issuer=spare.issuer, client_id=spare.client_id, force=True)


# ------------------------------------------------------------------ the checks


def table_names(rt) -> list[str]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        names = inspect(session.get_bind()).get_table_names()
    return sorted(n for n in names if n != "alembic_version")


def snapshot(rt, tables: list[str]) -> tuple[dict[str, int], set[bytes]]:  # type: ignore[no-untyped-def]
    with rt.sessions() as session:
        rows = {t: session.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables}
    keys = {k for k in rt.redis.scan_iter(count=1000) if not HARMLESS_KEYS.match(k)}
    return rows, keys


TAG = re.compile(r"<[^>]+>")
TRACEBACK = re.compile(r"Traceback \(most recent call last\)|File \"/")


def check_answer(
    response: Any,
    before: tuple[dict[str, int], set[bytes]],
    rt: Any,
    tables: list[str],
    where: str,
    written_before: bytes | None = None,
) -> None:
    """Never 5xx; a 4xx is readable and changed nothing (`written_before`: a Redis key the
    request's accepted predecessor wrote, such as a login's nonce)."""
    status = response.status_code
    body = response.get_data(as_text=True) if hasattr(response, "get_data") else response.text
    # The one route where Labpool is a gateway: dynamic registration fetches the platform's
    # configuration and posts to it; a platform that cannot be reached (a fuzzed URL) is a
    # 502 with a page that says so, and nothing is written.
    gateway = where.startswith("registration.register") and status == 502
    assert status < 500 or gateway, f"{where}: {status}\n{body[:1500]}"
    assert not TRACEBACK.search(body), f"{where}: a traceback in the answer\n{body[:1500]}"
    if not (400 <= status < 500 or gateway):
        return
    if not where.startswith(tuple(BARE_4XX)):
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("application/json"):
            message = json.loads(body).get("error")
            assert isinstance(message, str) and message.strip(), f"{where}: {body[:300]}"
        else:
            words = TAG.sub(" ", body.split("<body", 1)[-1])
            assert re.search(r"[A-Za-z]{3,}.*[A-Za-z]{3,}", words, re.S), f"{where}: {body[:500]}"
    rows, keys = snapshot(rt, tables)
    assert rows == before[0], f"{where}: {status} but rows changed {before[0]} -> {rows}"
    new = keys - before[1] - {written_before}
    assert not new, f"{where}: {status} but Redis got {sorted(new)[:5]}"


def session_cookie(world: dict[str, Any], who: str, fuzz_app: Any) -> str | None:
    if who in world["cookies"]:
        return world["cookies"][who]
    if who == "forged":
        return "eyJ1aWQiOjF9.forged.signature"
    if who == "other-key":
        from itsdangerous import URLSafeTimedSerializer

        other = URLSafeTimedSerializer("not-the-key", salt="cookie-session")
        return other.dumps({"uid": world["ids"]["teacher_id"], "admin": True, "csrf": "x"})
    return None


# Every status each endpoint answered in this run: the fuzzing must get past the doors.
ANSWERS: dict[str, set[int]] = collections.defaultdict(set)


def fuzz_request(
    fuzz_app: Any,
    world: dict[str, Any],
    rt: Any,
    tables: list[str],
    *,
    endpoint: str,
    method: str,
    path: str,
    who: str,
    csrf: str,
    form: dict[str, str],
    args: dict[str, str],
    extra_headers: dict[str, str],
    accept: str | None,
    upload: bytes | None = None,
    ide_cookie: str | None = None,
) -> Any:
    client = fuzz_app.test_client()
    cookie = session_cookie(world, who, fuzz_app)
    if cookie is not None:
        client.set_cookie("labpool_session", cookie)
    if ide_cookie is not None:
        client.set_cookie(IDE_COOKIE, ide_cookie)
    sent = dict(form)
    if csrf == "valid" and who in world["csrf"]:
        sent["csrf"] = world["csrf"][who]
    elif csrf == "wrong":
        sent["csrf"] = "not-the-token"
    hdrs = dict(extra_headers)
    if accept:
        hdrs["Accept"] = accept
    data: Any = sent
    if upload is not None:
        data = {**sent, "files": (__import__("io").BytesIO(upload), "lab.ipynb")}
    before = snapshot(rt, tables)
    kwargs: dict[str, Any] = {"query_string": args, "headers": hdrs}
    if method == "POST":
        kwargs["data"] = data
    response = client.open(path, method=method, **kwargs)
    ANSWERS[endpoint].add(response.status_code)

    where = f"{endpoint} {method} {path} as {who} (csrf {csrf}) form={str(form)[:200]} args={args}"
    check_answer(response, before, rt, tables, where)
    return response


# ------------------------------------------------------------------ the tests


def rules_of(app: Any) -> list[tuple[Any, str]]:
    return sorted(
        ((rule, method) for rule in app.url_map.iter_rules() for method in rule.methods or ()),
        key=lambda pair: (pair[0].rule, pair[1]),
    )


def fuzzed_rules(app: Any) -> list[tuple[Any, str]]:
    return [(rule, m) for rule, m in rules_of(app) if m not in ("HEAD", "OPTIONS")]


def test_every_route_is_described(fuzz_app) -> None:  # type: ignore[no-untyped-def]
    """A route the fuzzing does not know (its fields unnamed) fails here: add it to ROUTES."""
    endpoints = {rule.endpoint for rule, _ in rules_of(fuzz_app)}
    assert endpoints - set(ROUTES) == set(), "describe the new route(s) in ROUTES"
    assert set(ROUTES) - endpoints == set(), "ROUTES names route(s) the app no longer has"
    assert len(fuzzed_rules(fuzz_app)) >= 60


def path_strategy(rule: Any, world: dict[str, Any]) -> st.SearchStrategy[str]:
    """Values for the rule's converters, built into a path by the app's own URL map."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for name, converter in rule._converters.items():
        if isinstance(converter, IntegerConverter):
            parts[name] = ids_for(world["ids"], name)
        else:
            garbage = st.text(chars, min_size=1, max_size=80).filter(lambda s: "/" not in s)
            real = world["tokens"].get(rule.endpoint)
            parts[name] = st.one_of(garbage, st.just(real)) if real else garbage
    return st.fixed_dictionaries(parts)


def fuzz_every_route(fuzz_app, world, rt, examples: int) -> int:  # type: ignore[no-untyped-def]
    tables = table_names(rt)
    adapter = fuzz_app.url_map.bind("localhost")
    covered = 0
    for rule, method in fuzzed_rules(fuzz_app):
        fuzz_rule(fuzz_app, world, rt, tables, adapter, rule, method, examples)
        covered += 1
    return covered


def overlong_values(rt) -> list[str]:  # type: ignore[no-untyped-def]
    """Text longer than its column's String(n): SQLite stores it, PostgreSQL refuses it (a
    DataError, a 500 there). Checked after each route's fuzzing, so that the default run on
    SQLite finds what CI's PostgreSQL would."""
    import grading.models  # noqa: F401 - every package's tables in the metadata
    import lti_tool.models  # noqa: F401
    import provisioning.models  # noqa: F401
    from config.db import Base

    found = []
    with rt.sessions() as session:
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                length = getattr(column.type, "length", None)
                if not length or not isinstance(column.type, String):
                    continue
                n = session.execute(
                    select(func.count()).select_from(table).where(func.length(column) > length)
                ).scalar_one()
                if n:
                    found.append(f"{table.name}.{column.name} > {length} characters ({n} rows)")
    return found


def fuzz_rule(fuzz_app, world, rt, tables, adapter, rule, method, examples) -> None:  # type: ignore[no-untyped-def]
    """`examples` requests to one rule and method."""
    route = ROUTES[rule.endpoint]

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(
        values=path_strategy(rule, world),
        who=identities(rule.endpoint),
        csrf=csrf_choices,
        form=forms_for(route),
        args=args_for(route),
        extra=headers,
        accept=accepts,
        upload=st.one_of(st.none(), st.binary(max_size=200)) if route.upload else st.none(),
        huge=st.sampled_from([False] * 15 + [True]),
    )
    def one(values, who, csrf, form, args, extra, accept, upload, huge) -> None:  # type: ignore[no-untyped-def]
        try:
            path = adapter.build(rule.endpoint, values, method=method)
        except Exception:  # a value the converter cannot put in a URL
            return
        if huge and method == "POST":
            form = {**form, "x": HUGE}
        fuzz_request(
            fuzz_app,
            world,
            rt,
            tables,
            endpoint=rule.endpoint,
            method=method,
            path=path.split("?")[0],
            who=who,
            csrf=csrf,
            form=form,
            args={**args, **{k: str(v) for k, v in values.items() if k not in rule.arguments}},
            extra_headers=extra,
            accept=accept,
            upload=upload,
        )

    one()
    assert not overlong_values(rt), f"{rule.endpoint} {method}: {overlong_values(rt)}"


def test_every_route_never_500(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    covered = fuzz_every_route(fuzz_app, world, rt, PER_ROUTE)
    assert covered == len(fuzzed_rules(fuzz_app))
    # The fuzzing gets past the doors (session, CSRF, ids) of most routes, not only to 401s.
    doors = {401, 403, 404, 405, 413, 429}
    inside = sorted(e for e, answers in ANSWERS.items() if not answers <= doors)
    assert len(inside) >= 40, f"only {inside} answered anything but a refusal at the door"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not DEEP, reason="the deep run: LABPOOL_FUZZ_DEEP=1 (CI=true runs it)")
def test_every_route_never_500_deep(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    fuzz_every_route(fuzz_app, world, rt, PER_ROUTE_DEEP)


# The 500s the fuzzing found, pinned.


def test_csrf_token_with_non_ascii_characters_is_a_403(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzing: hmac.compare_digest raised TypeError on a non-ASCII form value
    (every POST with a session answered 500)."""
    response = fuzz_request(
        fuzz_app,
        world,
        rt,
        table_names(rt),
        endpoint="teacher_actions.warm_now",
        method="POST",
        path=f"/activities/{world['ids']['activity_id']}/warm-now",
        who="teacher",
        csrf="none",
        form={"csrf": "é"},
        args={},
        extra_headers={},
        accept=None,
    )
    assert response.status_code == 403
    assert "out of date" in response.get_data(as_text=True)


def test_proxy_secret_header_with_latin1_characters_is_a_403(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzing: the same TypeError on nginx's secret header holding a Latin-1
    character (a header's bytes are decoded as Latin-1)."""
    response = fuzz_request(
        fuzz_app,
        world,
        rt,
        table_names(rt),
        endpoint="proxy.auth",
        method="GET",
        path="/proxy/auth",
        who="nobody",
        csrf="none",
        form={},
        args={},
        extra_headers={PROXY_HEADER: "sécret", "X-Original-URI": "/ide/1/lab"},
        accept=None,
    )
    assert response.status_code == 403


def test_an_id_beyond_any_column_is_a_404(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzing: /activities/9223372036854775808/… overflowed the database
    driver (OverflowError on SQLite, a DataError on PostgreSQL)."""
    response = fuzz_request(
        fuzz_app,
        world,
        rt,
        table_names(rt),
        endpoint="submissions.download",
        method="GET",
        path=f"/activities/{2**63}/assignments/1/submissions/0.zip",
        who="teacher",
        csrf="none",
        form={},
        args={},
        extra_headers={},
        accept=None,
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("endpoint", "path", "field"),
    [
        (
            "teacher_actions.choose_environment",
            "/activities/{activity_id}/environment",
            "environment_id",
        ),
        ("admin.edit", "/admin/environments/{environment_id}", "memory_mb"),
        ("admin.add_environment", "/admin/environments", "max_processes"),
    ],
)
def test_a_form_number_beyond_any_column_is_a_400(
    fuzz_app, world, rt, endpoint, path, field
) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzing: a form's whole number larger than an INTEGER column went to
    the database (OverflowError, a 500)."""
    who = "admin" if endpoint.startswith("admin") else "teacher"
    response = fuzz_request(
        fuzz_app,
        world,
        rt,
        table_names(rt),
        endpoint=endpoint,
        method="POST",
        path=path.format(**world["ids"]),
        who=who,
        csrf="valid",
        form={"name": "fuzz-big", field: "99999999999999999999999"},
        args={},
        extra_headers={},
        accept=None,
    )
    assert response.status_code == 400


def test_environment_text_longer_than_its_column_is_a_400(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    """Found by the column-length check: an environment named with 101 characters was
    stored on SQLite and would be a DataError (500) on PostgreSQL."""
    response = fuzz_request(
        fuzz_app,
        world,
        rt,
        table_names(rt),
        endpoint="admin.add_environment",
        method="POST",
        path="/admin/environments",
        who="admin",
        csrf="valid",
        form={"name": "e" * 101},
        args={},
        extra_headers={},
        accept=None,
    )
    assert response.status_code == 400
    assert "at most 100 characters" in response.get_data(as_text=True)


# ------------------------------------------------------------------ the launch and the login

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False),
        st.text(chars, max_size=30),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(chars, max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def test_launch_bodies_never_500(fuzz_app, world, rt, platform) -> None:  # type: ignore[no-untyped-def]
    """Garbage and forged id_tokens (right shape, wrong keys, random claims and headers) with
    random state, with and without a matching state cookie."""
    tables = table_names(rt)
    foreign = foreign_private_key()

    @settings(max_examples=60 if not DEEP else 600, **FUZZ_SETTINGS)
    @given(
        kind=st.sampled_from(["garbage", "foreign", "platform-kid", "unsigned", "hs256"]),
        claims=st.dictionaries(st.text(chars, max_size=12), json_values, max_size=6),
        issuer=st.sampled_from([None, "platform", "junk"]),
        header=st.dictionaries(
            st.sampled_from(["kid", "alg", "typ", "jku", "x5u"]), json_values, max_size=3
        ),
        garbage=st.one_of(st.text(chars, max_size=200), st.just(HUGE[:200000])),
        state=st.one_of(st.text(chars, max_size=60), st.just("")),
        state_cookie=st.booleans(),
        accept=accepts,
    )
    @example(
        kind="platform-kid",
        claims={"aud": ["a", 1], "exp": "tomorrow", "iat": None},
        issuer="platform",
        header={},
        garbage="",
        state="s",
        state_cookie=True,
        accept=None,
    )
    def one(kind, claims, issuer, header, garbage, state, state_cookie, accept) -> None:  # type: ignore[no-untyped-def]
        body = dict(claims)
        if issuer == "platform":
            body.update(iss=platform.issuer, aud=platform.client_id)
        elif issuer == "junk":
            body["iss"] = "https://nobody.example"
        jose = {"typ": "JWT", "alg": "RS256", "kid": platform.kid, **header}
        if kind == "garbage":
            token = garbage
        elif kind == "foreign":
            token = encode_jwt(body, alg="RS256", key=foreign, header=jose)
        elif kind == "platform-kid":
            token, _ = platform.sign(
                body, header={k: v for k, v in header.items() if v is not None}
            )
        elif kind == "unsigned":
            token = encode_jwt(body, alg="none", key=None, header={**jose, "alg": "none"})
        else:
            token = encode_jwt(body, alg="HS256", key=platform.public_key_pem, header=jose)
        client = fuzz_app.test_client()
        if state_cookie and re.fullmatch(r"[\w.-]+", state):  # what a cookie can carry
            client.set_cookie(f"lti1p3-state-{state}", state)
        before = snapshot(rt, tables)
        response = client.post(
            "/lti/launch",
            data={"id_token": token, "state": state},
            headers={"Accept": accept} if accept else {},
        )
        check_answer(response, before, rt, tables, f"lti.launch {kind} {str(body)[:200]}")
        assert response.status_code != 303, "a forged launch was accepted"

    one()


def test_login_parameters_never_500(fuzz_app, world, rt, platform, tool) -> None:  # type: ignore[no-untyped-def]
    """OIDC login initiation with random parameters (some of them the real platform's)."""
    tables = table_names(rt)
    real = {
        "iss": [platform.issuer],
        "client_id": [platform.client_id],
        "target_link_uri": [f"{tool.url}/lti/launch", f"{tool.url}.evil.example/"],
        "lti_deployment_id": [platform.deployment_id],
        "login_hint": ["4"],
    }
    names = ["iss", "login_hint", "target_link_uri", "lti_message_hint", "client_id"]
    value_of = {
        name: st.one_of(field_value, st.sampled_from(real.get(name, [""]))) for name in names
    }

    @settings(max_examples=60 if not DEEP else 600, **FUZZ_SETTINGS)
    @given(
        params=st.fixed_dictionaries({}, optional=value_of),
        method=st.sampled_from(["GET", "POST"]),
        framed=st.booleans(),
        accept=accepts,
    )
    def one(params, method, framed, accept) -> None:  # type: ignore[no-untyped-def]
        client = fuzz_app.test_client()
        hdrs = {"Sec-Fetch-Dest": "iframe"} if framed else {}
        if accept:
            hdrs["Accept"] = accept
        before = snapshot(rt, tables)
        if method == "GET":
            response = client.get("/lti/login", query_string=params, headers=hdrs)
        else:
            response = client.post("/lti/login", data=params, headers=hdrs)
        check_answer(response, before, rt, tables, f"lti.login {method} {params}")

    one()


def test_proxy_auth_headers_never_500(fuzz_app, world, rt) -> None:  # type: ignore[no-untyped-def]
    """nginx's auth subrequest with the real secret and random URIs, methods, origins and
    IDE cookies: validly signed ones with random claims, tampered ones, garbage."""
    tables = table_names(rt)
    secret = fuzz_app.extensions["labpool.proxy_secret"]
    signer = fuzz_app.extensions["labpool.ide_cookies"]
    machine_id = world["ids"]["machine_id"]

    @settings(max_examples=60 if not DEEP else 600, **FUZZ_SETTINGS)
    @given(
        uri=st.one_of(
            st.just(f"/ide/{machine_id}/lab"),
            st.builds(lambda n, rest: f"/ide/{n}/{rest}", st.integers(0, 2**80), st.text(latin1)),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
        ),
        claims=st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "u": st.one_of(json_values, st.just(world["ids"]["user_id"])),
                    "m": st.one_of(json_values, st.just(machine_id), st.integers(0, 2**80)),
                }
            ),
        ),
        cookie_kind=st.sampled_from(["signed", "tampered", "garbage", "none"]),
        garbage=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=80),
        secret_ok=st.sampled_from([True, True, True, False]),
        extra=headers,
    )
    def one(uri, claims, cookie_kind, garbage, secret_ok, extra) -> None:  # type: ignore[no-untyped-def]
        client = fuzz_app.test_client()
        cookie = {
            "signed": lambda: signer.dumps(claims),
            "tampered": lambda: signer.dumps(claims)[:-2] + "xx",
            "garbage": lambda: garbage,
            "none": lambda: None,
        }[cookie_kind]()
        if cookie:
            client.set_cookie(IDE_COOKIE, cookie)
        hdrs = {**extra, "X-Original-URI": uri, PROXY_HEADER: secret if secret_ok else "nope"}
        before = snapshot(rt, tables)
        response = client.get("/proxy/auth", headers=hdrs)
        check_answer(response, before, rt, tables, f"proxy.auth {uri} {claims} {cookie_kind}")
        assert response.status_code in (200, 401, 403)

    one()


# ------------------------------------------------------------------ end to end, live tool

CLAIM = "https://purl.imsglobal.org/spec/lti/claim/"
CLAIM_NAMES = [
    "sub",
    "aud",
    "azp",
    "nonce",
    "exp",
    "iat",
    "name",
    "email",
    "given_name",
    CLAIM + "roles",
    CLAIM + "context",
    CLAIM + "resource_link",
    CLAIM + "deployment_id",
    CLAIM + "message_type",
    CLAIM + "version",
    CLAIM + "custom",
    CLAIM + "launch_presentation",
    CLAIM + "tool_platform",
    CLAIM + "lis",
    "https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice",
    "https://purl.imsglobal.org/spec/lti-ags/claim/endpoint",
]


@seed(15)
@settings(max_examples=25 if not DEEP else 300, **FUZZ_SETTINGS)
@given(
    claim=st.sampled_from(CLAIM_NAMES),
    value=json_values,
    kind=st.sampled_from(["learner", "instructor", "deep_linking"]),
)
@example(claim=CLAIM + "context", value={"id": ["2"]}, kind="learner")
# Found by the fuzzing (each was a 500):
@example(claim="aud", value=[], kind="learner")  # IndexError in pylti1p3's get_client_id
@example(claim=CLAIM + "context", value=["2"], kind="learner")  # AttributeError
@example(claim=CLAIM + "context", value=["2"], kind="deep_linking")
@example(claim=CLAIM + "roles", value=True, kind="learner")  # TypeError: not iterable
@example(claim=CLAIM + "roles", value=7, kind="deep_linking")
@example(claim=CLAIM + "context", value={"id": "c" * 300}, kind="instructor")  # PostgreSQL
@example(
    claim="https://purl.imsglobal.org/spec/lti-nrps/claim/namesroleservice",
    value="x",
    kind="instructor",
)
def test_signed_launch_with_a_claim_of_garbage(claim, value, kind) -> None:  # type: ignore[no-untyped-def]
    """A launch signed by the real platform through the live tool, with one claim replaced by
    random JSON: refused with a readable 4xx and nothing written, or accepted; never a 500."""
    fixtures = _live_fixtures()
    platform, tool, rt = fixtures["platform"], fixtures["tool"], fixtures["rt"]
    tables = table_names(rt)
    claims = getattr(platform, kind)(sub="5")
    before = snapshot(rt, tables)

    def mutate(body: dict[str, Any]) -> None:
        if claim == "nonce" and not isinstance(value, str):
            return  # the tool's own nonce is what makes the launch reach the deeper checks
        if (
            claim.startswith(CLAIM)
            and isinstance(body.get(claim), dict)
            and isinstance(value, dict)
        ):
            body[claim] = {**body[claim], **value}
        else:
            body[claim] = value

    with requests.Session() as browser:
        result = platform.launch(browser, tool.url, claims, mutate=mutate)
    response = result.launch_response
    # The login before the launch stored its nonce (the login was accepted): that key is the
    # login's; the refused launch itself must add nothing.
    nonce_key = next(
        (k for k in rt.redis.scan_iter(match=f"*nonce-{result.nonce}") if result.nonce), None
    )

    class Answer:
        status_code = response.status_code
        headers = response.headers

        @staticmethod
        def get_data(as_text: bool = True) -> str:
            return response.text

    check_answer(
        Answer, before, rt, tables, f"live launch {claim}={value!r:.200}", written_before=nonce_key
    )


@pytest.fixture(autouse=True)
def _remember_live(request) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Hypothesis runs a test's body many times and must not get function-scoped fixtures as
    arguments: the live test takes the session's tool, platform and runtime from here."""
    if request.node.name.startswith("test_signed_launch"):
        _LIVE.update(
            platform=request.getfixturevalue("platform"),
            tool=request.getfixturevalue("tool"),
            rt=request.getfixturevalue("rt"),
        )
    yield
    _LIVE.clear()


_LIVE: dict[str, Any] = {}


def _live_fixtures() -> dict[str, Any]:
    return _LIVE


def test_a_nul_in_the_login_client_id_is_refused_not_a_500(tool, platform):
    """Found by the fuzzing on PostgreSQL (which refuses NUL in a query's text): a 500."""
    import requests

    answer = requests.post(
        f"{tool.url}/lti/login",
        data={
            "iss": platform.issuer,
            "client_id": "\x00",
            "login_hint": "4",
            "target_link_uri": f"{tool.url}/lti/launch",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert answer.status_code == 400, answer.text[:300]
