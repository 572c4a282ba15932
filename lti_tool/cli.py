"""The `labpool` command: run the service, register platforms, rotate keys, migrate."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from config.db import transaction
from config.settings import Settings, SettingsError, load_settings
from lti_tool.registrations import moodle_values
from lti_tool.startup import prepare
from provisioning.backends import BACKENDS


def _settings() -> Settings:
    try:
        return load_settings()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
def main() -> None:
    """Labpool: a machine with a browser IDE for every student, from inside Moodle."""


@main.command()
def run() -> None:
    """Start Labpool: web app (gunicorn), RQ worker, and an embedded Redis if needed."""
    from lti_tool.runner import serve

    sys.exit(serve(_settings(), demo=False))


@main.command()
def demo() -> None:
    """Like `run`, plus a small practice platform with "launch as student/teacher" links."""
    from lti_tool.runner import serve

    sys.exit(serve(_settings(), demo=True))


@main.command("ide-env")
def ide_env() -> None:
    """Make (or check) the Python environment students' IDEs run on (local backend)."""
    from provisioning.ide_env import IdeEnvError, make_ide_env

    settings = _settings()
    try:
        python = make_ide_env(settings.ide_env_dir, echo=click.echo)
    except IdeEnvError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"IDE environment ready: {python}")


@main.command()
@click.option("--burst", is_flag=True, help="Stop when the queue is empty.")
@click.option(
    "--queue",
    "which",
    type=click.Choice(["jobs", "grading"]),
    default="jobs",
    help="jobs: provisioning, release, collection, scores; grading: the autograder "
    "(QUEUE_NAME-grading), apart so that a class's grading never delays a launch.",
)
def worker(burst: bool, which: str) -> None:
    """Run an RQ worker for provisioning jobs (or, with --queue grading, autograde jobs)."""
    import redis

    # Everything a job needs, imported once: machines point at users and courses (every
    # table must be in the metadata), and the reconciler brings openstacksdk.
    import grading.autograde  # noqa: F401
    import grading.outbox  # noqa: F401
    import lti_tool.models  # noqa: F401
    import lti_tool.services.nrps  # noqa: F401
    import provisioning.reconciler  # noqa: F401
    from config.logging import configure_logging
    from provisioning.queue import LabpoolWorker

    settings = _settings()
    # Blocking dequeues need a connection without the web's short socket timeout.
    conn = redis.Redis.from_url(settings.effective_redis_url)
    # Jobs run in the worker process itself (RQ's SimpleWorker), not a process forked per
    # job: the worker keeps its database pool and its one cloud connection (a new one costs
    # a token and discovery requests), and a reconciler pass starts in milliseconds. Job
    # timeouts still hold (SIGALRM), and a killed worker loses nothing: jobs are triggers.
    queue = settings.queue_name if which == "jobs" else f"{settings.queue_name}-grading"
    click.echo(f"labpool worker: taking jobs from {queue!r}")
    # RQ says four lines per job: an idle service's periodic passes would fill the log. Its
    # warnings and errors (a failed job) stay; Labpool's own modules log what happened.
    configure_logging(settings)
    LabpoolWorker([queue], connection=conn).work(burst=burst, logging_level=_rq_log_level(settings))


def _rq_log_level(settings: Settings) -> str:
    return "DEBUG" if settings.log_level.lower() == "debug" else "WARNING"


@main.command()
def cron() -> None:
    """Run the periodic triggers (RQ's own cron scheduler): a reconciler pass per cloud pool,
    the idle check, the roster sync of every course, and the scores owed to gradebooks."""
    import redis
    from rq.cron import CronScheduler
    from rq.exceptions import StopRequested

    from config.logging import configure_logging
    from grading.autograde import REQUEUE_INTERVAL_S, requeue_owed_autogrades_job
    from grading.outbox import DUE_PASS_INTERVAL_S, send_due_scores_job
    from lti_tool.services.nrps import sync_all_courses_job
    from provisioning.idle import release_idle_job
    from provisioning.jobs import reconcile_all

    settings = _settings()
    configure_logging(settings)
    conn = redis.Redis.from_url(settings.effective_redis_url)
    scheduler = CronScheduler(connection=conn, logging_level=_rq_log_level(settings))
    # RQ sets the level only when its logger has no handler yet; configure_logging gave the
    # root one, so say it here: one "Enqueued job" line per pass would fill an idle log.
    logging.getLogger("rq.cron").setLevel(_rq_log_level(settings))
    click.echo("labpool cron: periodic passes registered")
    queue = settings.queue_name
    # Kept in Redis as the triggers' jobs are (provisioning/queue.py), not RQ's defaults: a
    # result for 500 s and a failure for a year, from a job that runs every second or minute
    # (tests/test_soak_class_day.py).
    kept = {"result_ttl": 60, "failure_ttl": 24 * 3600}
    scheduler.register(reconcile_all, queue, interval=settings.reconcile_interval_s, **kept)
    scheduler.register(release_idle_job, queue, interval=settings.idle_check_interval_s, **kept)
    scheduler.register(
        sync_all_courses_job, queue, interval=settings.roster_sync_interval_s, **kept
    )
    # Scores the outbox owes and whose time has come (retries, lost jobs): the database
    # remembers them, this pass sends them.
    scheduler.register(send_due_scores_job, queue, interval=DUE_PASS_INTERVAL_S, **kept)
    # Autogrades owed whose job was lost or whose worker was killed: queued again.
    scheduler.register(requeue_owed_autogrades_job, queue, interval=REQUEUE_INTERVAL_S, **kept)
    try:
        scheduler.start()
    except (StopRequested, KeyboardInterrupt):  # SIGTERM/SIGINT: a stop asked for, not a crash
        click.echo("labpool cron: stopped")


@main.group()
def env() -> None:
    """Environments: what machines run (IDE, image, flavor, network) and their pools."""


@env.command("add")
@click.argument("name")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default="local")
@click.option(
    "--ide",
    "ide_kind",
    type=click.Choice(["jupyterlab", "code-server", "terminal"]),
    default="jupyterlab",
)
@click.option("--image", "image_id", help="Golden image id (openstack).")
@click.option("--flavor", "flavor_id", help="Flavor id (openstack).")
@click.option("--network", "network_id", help="Private network id (openstack).")
@click.option("--network-name", help="Its name, as Nova lists addresses (optional).")
@click.option("--security-group", "security_groups", multiple=True)
@click.option("--key-name", help="SSH key pair for admins (optional).")
@click.option("--volume-size", "volume_size_gb", type=int, default=10, show_default=True)
@click.option("--warm-target", type=int, default=0, show_default=True)
@click.option("--max-size", type=int, default=50, show_default=True)
@click.option(
    "--memory-mb",
    type=int,
    default=2048,
    show_default=True,
    help="Sandbox limit (local): address space of each process, MB; 0: none.",
)
@click.option(
    "--max-processes",
    type=int,
    default=256,
    show_default=True,
    help="Sandbox limit (local): processes and threads of the student; 0: none.",
)
@click.option(
    "--max-open-files",
    type=int,
    default=1024,
    show_default=True,
    help="Sandbox limit (local): open files per process; 0: none.",
)
@click.option(
    "--max-file-size-mb",
    type=int,
    default=1024,
    show_default=True,
    help="Sandbox limit (local): the largest file a process may write, MB; 0: none.",
)
@click.option(
    "--cpu-seconds",
    type=int,
    default=0,
    show_default=True,
    help="Sandbox limit (local): CPU seconds per process; 0: none.",
)
def env_add(name: str, **options: object) -> None:
    """Define an environment (a cloud one gets its pool, and a security group whose IDE port
    admits LABPOOL_PROXY_ADDRESSES alone: created, or the --security-group ones checked)."""
    from provisioning.environments import EnvironmentRejected, add_secured_environment

    rt = prepare(_settings())
    options["security_groups"] = list(options["security_groups"])  # type: ignore[call-overload]
    try:
        added, backend, groups = add_secured_environment(
            rt.sessions, rt.settings, name=name, **options
        )
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"environment {added} ({backend}) added"
        + (f"; security groups {', '.join(groups)}" if groups else "")
    )


@env.command("check")
@click.argument("name")
def env_check(name: str) -> None:
    """Check a cloud environment's security groups again (one without gets its own)."""
    from provisioning.environments import EnvironmentRejected, recheck_security_groups

    rt = prepare(_settings())
    try:
        groups = recheck_security_groups(rt.sessions, rt.settings, name)
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"environment {name}: security groups {', '.join(groups)} admit the IDE port "
        "from the proxy alone"
    )


@env.command("edit")
@click.argument("name")
@click.option("--idle-timeout", "idle_timeout_s", type=int, help="Seconds without activity.")
@click.option("--warm-target", type=int, help="Warm machines kept (pooled environments).")
@click.option("--max-size", type=int, help="Machines at most (pooled environments).")
@click.option("--image", "image_id", help="A new golden image id (rolls the pool).")
@click.option("--flavor", "flavor_id", help="A new flavor id (rolls the pool).")
@click.option("--memory-mb", type=int, help="Sandbox limit (local), MB; 0: none.")
@click.option("--max-processes", type=int, help="Sandbox limit (local); 0: none.")
@click.option("--max-open-files", type=int, help="Sandbox limit (local); 0: none.")
@click.option("--max-file-size-mb", type=int, help="Sandbox limit (local), MB; 0: none.")
@click.option("--cpu-seconds", type=int, help="Sandbox limit (local); 0: none.")
def env_edit(name: str, **changes: object) -> None:
    """Change an environment; what is not given stays. A new image or flavor rolls a pool:
    warm machines are replaced at once, students' machines when they are released."""
    from provisioning.environments import EnvironmentRejected, edit_environment
    from provisioning.triggers import reconcile_soon

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            edit = edit_environment(session, name, **changes)  # type: ignore[arg-type]
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    if edit.pool_id is not None:
        reconcile_soon(rt, edit.pool_id)
    click.echo(edit.summary())


@env.command("retire")
@click.argument("name")
def env_retire(name: str) -> None:
    """Retire an environment: launches onto it start no new machine (and say why), teachers
    can no longer pick it, its pool keeps no warm machine; machines already handed out run
    until they are released. `env restore` takes it back into use."""
    _retire(name, retired=True)


@env.command("restore")
@click.argument("name")
def env_restore(name: str) -> None:
    """Take a retired environment back into use."""
    _retire(name, retired=False)


def _retire(name: str, *, retired: bool) -> None:
    from provisioning.environments import EnvironmentRejected, retire_environment

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            retire_environment(session, name, retired=retired)
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"environment {name} "
        + (
            "retired: no new machines (within 10 s in every web process)"
            if retired
            else "back in use"
        )
    )


@env.command("courses")
@click.argument("name")
@click.argument("course_ids", nargs=-1, type=int, metavar="[COURSE_ID]...")
@click.option("--all", "every_course", is_flag=True, help="Open it to every course again.")
def env_courses(name: str, course_ids: tuple[int, ...], every_course: bool) -> None:
    """Which courses may use environment NAME: with COURSE_IDs (as `labpool courses list`
    shows them), only those courses' teachers can pick it and only their launches start
    machines of it (others are refused and told why; machines already handed out stay until
    released); with --all, every course may again. Without either, say which courses may
    use it now. The default environment stays open to every course."""
    from provisioning.course_access import set_environment_courses
    from provisioning.environments import EnvironmentRejected

    if every_course and course_ids:
        raise click.UsageError("give course ids or --all, not both")
    rt = prepare(_settings())
    if not every_course and not course_ids:
        from lti_tool.admin import overview

        with rt.sessions() as session:
            row = next((e for e in overview(session).environments if e.name == name), None)
        if row is None:
            raise click.ClickException(f"no environment named {name!r}")
        if row.courses is None:
            click.echo(f"environment {name}: open to every course")
        else:
            listed = ", ".join(f"course {c.id} ({c.title})" for c in row.courses) or "none"
            click.echo(f"environment {name}: only for {listed}")
        return
    try:
        with transaction(rt.sessions) as session:
            access = set_environment_courses(
                session, name, None if every_course else list(course_ids)
            )
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(access.summary() + " (every web process within 10 s)")


@main.group()
def courses() -> None:
    """Courses (LTI contexts) Labpool has seen a launch from."""


@courses.command("list")
def courses_list() -> None:
    """Every course: its id (what `labpool env courses` takes), platform, context id, title."""
    from lti_tool.admin import course_rows

    rt = prepare(_settings())
    with rt.sessions() as session:
        rows = course_rows(session)
    if not rows:
        click.echo("no courses yet (a course appears at its first launch)")
    for row in rows:
        click.echo(f"{row.id}  {row.issuer}  context {row.context_id or '(none)'}  {row.title}")


@env.command("list")
def env_list() -> None:
    """Every environment: its IDE, backend, image and flavor, its pool, and the courses it
    is limited to (if it is)."""
    from provisioning.course_access import courses_of
    from provisioning.models import Environment, Pool

    rt = prepare(_settings())
    with rt.sessions() as session:
        listed = courses_of(session, session.scalars(select(Environment.id)))
        for environment, pool in session.execute(
            select(Environment, Pool)
            .outerjoin(Pool, Pool.environment_id == Environment.id)
            .order_by(Environment.id)
        ):
            line = f"{environment.name}: {environment.ide_kind.value} on {environment.backend}"
            line += " RETIRED" if environment.retired_at else ""
            if environment.limited_to_courses:
                ids = listed.get(environment.id, [])
                line += f" (only courses {', '.join(map(str, ids))})" if ids else " (no course)"
            known = BACKENDS.get(environment.backend)
            if known and known.capabilities.needs:  # it boots an image
                line += f" (image {environment.image_id}, flavor {environment.flavor_id})"
            if pool is not None:
                line += f"; pool warm {pool.warm_target} max {pool.max_size}"
                line += " PAUSED" if pool.paused else ""
                for note in (pool.quota_note, pool.hold_note):
                    line += f"\n    {note}" if note else ""
            click.echo(line)


@main.command("pool")
@click.argument("environment")
@click.option("--warm-target", type=int)
@click.option("--max-size", type=int)
@click.option("--pause/--resume", "paused", default=None)
def pool_set(
    environment: str, warm_target: int | None, max_size: int | None, paused: bool | None
) -> None:
    """Change a cloud environment's pool (takes effect at the next pass)."""
    from provisioning.environments import EnvironmentRejected, set_pool
    from provisioning.triggers import reconcile_soon

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            pool = set_pool(
                session, environment, warm_target=warm_target, max_size=max_size, paused=paused
            )
            pool_id = pool.id
            click.echo(
                f"pool of {environment}: warm {pool.warm_target}, max {pool.max_size}"
                + (", paused" if pool.paused else "")
            )
    except EnvironmentRejected as exc:
        raise click.ClickException(str(exc)) from exc
    reconcile_soon(rt, pool_id)


@main.group()
def volumes() -> None:
    """Students' volumes on the cloud (never deleted automatically)."""


@volumes.command("list")
def volumes_list() -> None:
    """Every student volume: whose, which course, size, status and cloud id."""
    from lti_tool.models import Course, User
    from provisioning.models import StudentVolume

    rt = prepare(_settings())
    with rt.sessions() as session:
        rows = session.execute(
            select(StudentVolume, User, Course)
            .join(User, User.id == StudentVolume.owner_id)
            .join(Course, Course.id == StudentVolume.course_id)
            .order_by(StudentVolume.id)
        ).all()
        if not rows:
            click.echo("no student volumes (they are made on the cloud backend, at first need)")
        for volume, user, course in rows:
            click.echo(
                f"{volume.id}  {user.name or user.sub} in {course.label or course.context_id}: "
                f"{volume.size_gb} GB {volume.status} (cloud id {volume.volume_id})"
            )


@volumes.command("delete")
@click.argument("volume_row_id", type=int)
@click.confirmation_option(prompt="Delete this student's files for good?")
def volumes_delete(volume_row_id: int) -> None:
    """Delete a student's volume (their files) from the cloud and the database."""
    from provisioning.backends import backends_that, volumes_backend_for
    from provisioning.errors import ProvisioningError
    from provisioning.models import Environment, StudentVolume

    rt = prepare(_settings())
    with transaction(rt.sessions) as session:
        volume = session.get(StudentVolume, volume_row_id)
        if volume is None:
            raise click.ClickException(f"no volume {volume_row_id}")
        if volume.status == "in-use":
            raise click.ClickException(
                "the volume is attached; release the student's machine first"
            )
        env = session.scalars(
            select(Environment).where(
                Environment.backend.in_(backends_that(lambda can: can.volumes))
            )
        ).first()
        if volume.volume_id and env is not None:
            try:
                volumes_backend_for(env, rt.settings).delete_volume(volume.volume_id)
            except ProvisioningError as exc:
                raise click.ClickException(str(exc)) from exc
        session.delete(volume)
    click.echo(f"volume {volume_row_id} deleted")


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply all migrations."""
    prepare(_settings())
    click.echo("database is up to date")


@main.group()
def keys() -> None:
    """The tool's signing keys."""


@keys.command("rotate")
@click.option(
    "--grace-hours", type=float, default=None, help="How long the old key stays published."
)
def keys_rotate(grace_hours: float | None) -> None:
    """Make the next key active, create a new next key, retire the old active key."""
    from jwks.keys import rotate_keys

    settings = _settings()
    rt = prepare(settings)
    grace = (
        timedelta(hours=grace_hours)
        if grace_hours is not None
        else timedelta(seconds=settings.key_grace_s)
    )
    with transaction(rt.sessions) as session:
        key = rotate_keys(session, settings.secret_key, grace)
        click.echo(f"active key is now {key.kid}; the old one stays published for {grace}")


@keys.command("list")
def keys_list() -> None:
    """The tool's signing keys: kid, state (next, active, retired) and until when published."""
    from jwks.models import ToolKey

    rt = prepare(_settings())
    with rt.sessions() as session:
        for key in session.scalars(select(ToolKey).order_by(ToolKey.id)):
            expires = (
                f" (published until {key.expires_at:%Y-%m-%d %H:%M})" if key.expires_at else ""
            )
            click.echo(f"{key.kid}  {key.state.value}{expires}")


@main.group()
def platform() -> None:
    """Registered LTI platforms."""


@platform.command("add")
@click.option("--issuer", required=True)
@click.option("--client-id", required=True)
@click.option("--deployment-id", "deployment_ids", required=True, multiple=True)
@click.option("--auth-url", required=True)
@click.option("--token-url", required=True)
@click.option("--jwks-url", required=True)
@click.option("--name", default="")
def platform_add(
    issuer: str,
    client_id: str,
    deployment_ids: tuple[str, ...],
    auth_url: str,
    token_url: str,
    jwks_url: str,
    name: str,
) -> None:
    """Register a platform (Moodle shows these values after the tool is added)."""
    from lti_tool.registrations import RegistrationError, register_platform

    settings = _settings()
    rt = prepare(settings)
    try:
        with transaction(rt.sessions) as session:
            register_platform(
                session,
                settings,
                issuer=issuer,
                client_id=client_id,
                deployment_ids=deployment_ids,
                auth_url=auth_url,
                token_url=token_url,
                jwks_url=jwks_url,
                name=name,
            )
    except RegistrationError as exc:
        raise click.ClickException(str(exc)) from exc
    except IntegrityError as exc:
        raise click.ClickException("that registration conflicts with an existing one") from exc
    click.echo(f"registered {issuer} (client {client_id}, deployments {', '.join(deployment_ids)})")


@platform.command("list")
def platform_list() -> None:
    """Every registered platform with its client id, deployments and URLs."""
    from lti_tool.models import Platform

    rt = prepare(_settings())
    with rt.sessions() as session:
        platforms = session.scalars(select(Platform).order_by(Platform.id)).all()
        if not platforms:
            click.echo("no platforms registered; see `labpool platform add --help`")
        for p in platforms:
            deployments = ", ".join(d.deployment_id for d in p.deployments)
            off = "  DISABLED" if p.disabled_at else ""
            click.echo(f"{p.issuer}  client {p.client_id}  deployments [{deployments}]{off}")
            click.echo(f"    auth {p.auth_url}\n    token {p.token_url}\n    jwks {p.jwks_url}")


@platform.command("remove")
@click.option("--issuer", required=True)
@click.option("--client-id", default=None, help="Needed when the issuer is registered twice.")
@click.option(
    "--force",
    is_flag=True,
    help="Remove even while its courses have live machines (they are stopped) or volumes.",
)
def platform_remove(issuer: str, client_id: str | None, force: bool) -> None:
    """Remove a registration with its courses (enrolments, activities, assignments,
    submissions' records, grades, unsent scores). People, machines' records, environments
    and files on disk stay. Refused while its courses have live machines or students'
    volumes, unless --force."""
    from lti_tool.registrations import RegistrationError, remove_platform, stop_removed_machines

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            removal = remove_platform(session, issuer=issuer, client_id=client_id, force=force)
    except RegistrationError as exc:
        raise click.ClickException(str(exc)) from exc
    stop_removed_machines(rt, removal)
    click.echo(
        f"removed {removal.issuer} (client {removal.client_id}, deployments "
        f"{', '.join(removal.deployment_ids)}): {removal.summary()}"
    )


@platform.command("disable")
@click.option("--issuer", required=True)
@click.option("--client-id", default=None, help="Needed when the issuer is registered twice.")
def platform_disable(issuer: str, client_id: str | None) -> None:
    """Refuse the platform's logins and launches (with a message saying so) until `platform
    enable`; its courses, machines and grades stay, and scores still owed are sent."""
    _set_disabled(issuer, client_id, disabled=True)


@platform.command("enable")
@click.option("--issuer", required=True)
@click.option("--client-id", default=None, help="Needed when the issuer is registered twice.")
def platform_enable(issuer: str, client_id: str | None) -> None:
    """Accept a disabled platform's launches again."""
    _set_disabled(issuer, client_id, disabled=False)


def _set_disabled(issuer: str, client_id: str | None, *, disabled: bool) -> None:
    from lti_tool.registrations import RegistrationError, set_platform_disabled

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            found = set_platform_disabled(
                session, issuer=issuer, client_id=client_id, disabled=disabled
            )
            which = f"{found.issuer} (client {found.client_id})"
    except RegistrationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{which} {'disabled' if disabled else 'enabled'}: web processes take it within 30 s"
    )


@main.command("admin-token")
@click.option(
    "--expires",
    default="1h",
    show_default=True,
    help="How long the link may be opened: 10m, 1h, 2d (1 minute to 7 days).",
)
def admin_token(expires: str) -> None:
    """Print a one-time link to the admin page (signed with the secret key; opening it sets
    an admin session in that browser for 8 hours)."""
    from lti_tool.admin import MAX_TOKEN_S, make_admin_token
    from lti_tool.registration_links import parse_duration

    settings = _settings()
    try:
        lifetime = parse_duration(expires)
        if lifetime > MAX_TOKEN_S:
            raise ValueError(f"an admin link lives 7 days at most, not {expires!r}")
        token = make_admin_token(settings, lifetime)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from exc
    click.echo(settings.url(f"/admin/token/{token}"))
    click.echo(
        "One use; whoever opens it first administers Labpool. Open it in your browser.",
        err=True,
    )


@main.group()
def scores() -> None:
    """Scores owed to the platforms' gradebooks (the AGS outbox)."""


@scores.command("send-again")
@click.argument("row_id", type=int)
def scores_send_again(row_id: int) -> None:
    """Owe a failed score's current grade again (a fresh outbox row), as the admin page's
    and the teacher's "send again" do."""
    from grading.outbox import SEND_JOB
    from lti_tool.admin import ScoreNotResendable, send_failed_score_again
    from provisioning.queue import enqueue

    rt = prepare(_settings())
    try:
        with transaction(rt.sessions) as session:
            new_id = send_failed_score_again(session, row_id)
    except ScoreNotResendable as exc:
        raise click.ClickException(str(exc)) from exc
    enqueue(rt.redis, rt.settings.queue_name, SEND_JOB, new_id)
    click.echo(f"score {row_id} owed again as {new_id}; a worker sends it")


@main.command("registration-link")
@click.option(
    "--expires",
    default="24h",
    show_default=True,
    help="How long the link may be used: 30m, 24h, 7d (1 minute to 30 days).",
)
def registration_link(expires: str) -> None:
    """Print a one-time link for LTI Dynamic Registration: paste it in Moodle as Tool URL
    (Manage tools), then click "Add LTI Advantage"."""
    import redis

    from lti_tool.registration_links import RegistrationLinks, parse_duration

    settings = _settings()
    try:
        lifetime = parse_duration(expires)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--expires") from exc
    rt = prepare(settings)
    try:
        link = RegistrationLinks(rt.redis).create(lifetime)
    except redis.RedisError as exc:
        raise click.ClickException(
            f"cannot keep the link in Redis ({type(exc).__name__}): links live in the Redis "
            "of the running Labpool; start it (`labpool run`) or set LABPOOL_REDIS_URL"
        ) from exc
    until = datetime.fromtimestamp(link.expires_at, UTC)
    click.echo(settings.url(f"/lti/register/{link.token}"))
    click.echo(
        f"One use, until {until:%Y-%m-%d %H:%M} UTC. In Moodle: Site administration → Plugins → "
        "Activity modules → External tool → Manage tools → Tool URL, paste it, "
        '"Add LTI Advantage"; then activate the pending tool.',
        err=True,
    )


@main.command("nginx-config")
@click.option(
    "--tool",
    "tool_upstream",
    default=None,
    help="Where the tool (gunicorn) listens, host:port (default: LABPOOL_LISTEN).",
)
@click.option(
    "--listen", default=None, help="nginx's listen directive (default: the public URL's port)."
)
@click.option(
    "--auth-cache",
    "auth_cache_s",
    type=int,
    default=5,
    show_default=True,
    help="Seconds nginx reuses a positive auth answer (0: off).",
)
@click.option(
    "--auth-cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where nginx caches auth answers (default /var/lib/nginx/labpool-auth).",
)
@click.option(
    "--standalone",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Render a whole nginx.conf keeping its files under this folder.",
)
def nginx_config(
    tool_upstream: str | None,
    listen: str | None,
    auth_cache_s: int,
    auth_cache_dir: Path | None,
    standalone: Path | None,
) -> None:
    """Print the nginx configuration that puts the tool and its IDEs behind one origin."""
    from lti_tool.nginx import render_server, render_standalone

    settings = _settings()
    upstream = tool_upstream or f"{settings.listen_host}:{settings.listen_port}"
    if standalone is not None:
        click.echo(
            render_standalone(
                settings,
                prefix=standalone,
                tool_upstream=upstream,
                listen=listen,
                auth_cache_s=auth_cache_s,
            )
        )
    else:
        click.echo(
            render_server(
                settings,
                tool_upstream=upstream,
                listen=listen,
                auth_cache_s=auth_cache_s,
                cache_dir=auth_cache_dir,
            )
        )


@main.command("moodle-values")
def moodle_values_cmd() -> None:
    """Print what an admin pastes into Moodle's "Configure a tool manually" form."""
    for label, value in moodle_values(_settings()):
        click.echo(f"{label + ':':22} {value}")


if __name__ == "__main__":
    main()
