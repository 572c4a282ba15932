"""Environments (what a machine runs) and their pools (how many are kept warm), as an admin
defines them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from config.db import transaction, utcnow
from config.settings import Settings
from provisioning.backends import BACKENDS, Capabilities
from provisioning.errors import ProvisioningError
from provisioning.models import Environment, IdeKind, Machine, MachineState, Pool


class EnvironmentRejected(ValueError):
    """An environment's definition is not acceptable; the message says which part."""


def add_environment(
    session: Session,
    *,
    name: str,
    backend: str = "local",
    ide_kind: str = "jupyterlab",
    image_id: str | None = None,
    flavor_id: str | None = None,
    network_id: str | None = None,
    network_name: str | None = None,
    security_groups: list[str] | None = None,
    key_name: str | None = None,
    volume_size_gb: int = 10,
    idle_timeout_s: int = 3600,
    warm_target: int = 0,
    max_size: int = 50,
    memory_mb: int = 2048,
    max_processes: int = 256,
    max_open_files: int = 1024,
    max_file_size_mb: int = 1024,
    cpu_seconds: int = 0,
) -> Environment:
    """Define an environment; a pooled (cloud) environment gets its pool at once. Refused
    when its backend cannot run its IDE: accepted, every launch would fail."""
    if not name.strip():
        raise EnvironmentRejected("the environment needs a name")
    _check_lengths(
        name=name,
        image_id=image_id,
        flavor_id=flavor_id,
        network_id=network_id,
        network_name=network_name,
        key_name=key_name,
    )
    if backend not in BACKENDS:
        raise EnvironmentRejected(
            f"backend must be {' or '.join(repr(b) for b in sorted(BACKENDS))}, not {backend!r}"
        )
    can = BACKENDS[backend].capabilities
    try:
        kind = IdeKind(ide_kind)
    except ValueError:
        kinds = ", ".join(k.value for k in IdeKind)
        raise EnvironmentRejected(f"IDE must be one of {kinds}, not {ide_kind!r}") from None
    if kind.value not in can.ide_kinds:
        raise EnvironmentRejected(
            f"the {backend} backend cannot run {kind.value}; it runs "
            f"{', '.join(sorted(can.ide_kinds))}"
        )
    given = {"image_id": image_id, "flavor_id": flavor_id, "network_id": network_id}
    missing = [flag for field, flag in can.needs if not given.get(field)]
    if missing:
        raise EnvironmentRejected(f"an {backend} environment needs {', '.join(missing)}")
    if session.scalar(select(Environment.id).where(Environment.name == name)) is not None:
        raise EnvironmentRejected(f"an environment named {name!r} exists already")
    _check_pool_sizes(warm_target, max_size)
    limits = {
        "memory_mb": memory_mb,
        "max_processes": max_processes,
        "max_open_files": max_open_files,
        "max_file_size_mb": max_file_size_mb,
        "cpu_seconds": cpu_seconds,
    }
    _check_limits(limits)
    env = Environment(
        name=name,
        backend=backend,
        ide_kind=kind,
        image_id=image_id,
        flavor_id=flavor_id,
        network_id=network_id,
        network_name=network_name,
        security_groups=security_groups or [],
        key_name=key_name,
        volume_size_gb=volume_size_gb,
        idle_timeout_s=idle_timeout_s,
        **limits,
    )
    session.add(env)
    session.flush()
    if can.pooled:
        session.add(Pool(environment_id=env.id, warm_target=warm_target, max_size=max_size))
        session.flush()
    return env


# The columns' lengths: longer text is refused here, not by PostgreSQL (a DataError).
TEXT_LIMITS = {
    "name": 100,
    "image_id": 64,
    "flavor_id": 64,
    "network_id": 64,
    "network_name": 255,
    "key_name": 255,
}


def _check_lengths(**values: str | None) -> None:
    for field_name, value in values.items():
        if value is not None and len(value) > TEXT_LIMITS[field_name]:
            raise EnvironmentRejected(
                f"{field_name.replace('_', ' ')} must be at most {TEXT_LIMITS[field_name]} "
                f"characters, not {len(value)}"
            )


# Below these a JupyterLab cannot start (it reserves address space, runs threads, opens
# files); 0 means no limit.
LIMIT_FLOORS = {
    "memory_mb": 512,
    "max_processes": 32,
    "max_open_files": 64,
    "max_file_size_mb": 1,
    "cpu_seconds": 60,
}


def _check_limits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        if value < 0 or 0 < value < LIMIT_FLOORS[name]:
            raise EnvironmentRejected(
                f"{name.replace('_', '-')} must be 0 (no limit) or at least "
                f"{LIMIT_FLOORS[name]}, not {value}"
            )


def add_secured_environment(
    sessions: sessionmaker[Session], settings: Settings, *, name: str, **options: Any
) -> tuple[str, str, list[str]]:
    """`add_environment` as `labpool env add` does it: a cloud environment's security groups
    are first created or checked (see `backends.security_groups`) and stored as the ids its
    machines boot with. Returns (name, backend, group ids). Refused (EnvironmentRejected),
    nothing is stored; the cloud keeps only a group Labpool created for it, which a retry
    finds and checks again."""
    from provisioning.backends.security_groups import secure_ide_port

    with sessions() as session:  # a dry run: the definition's own mistakes come first
        draft = add_environment(session, name=name, **options)
        guarded, ide_port = _can(draft.backend).security_groups, draft.ide_port or 8888
        session.rollback()
    groups = list(options.get("security_groups") or [])
    if guarded:
        try:
            groups = secure_ide_port(
                _cloud(settings),
                environment_name=name,
                groups=groups,
                ide_port=ide_port,
                proxy_addresses=settings.proxy_addresses,
            )
        except ProvisioningError as exc:
            raise EnvironmentRejected(f"environment {name!r} not added: {exc}") from exc
    with transaction(sessions) as session:
        environment = add_environment(session, name=name, **{**options, "security_groups": groups})
        return environment.name, environment.backend, list(environment.security_groups)


def recheck_security_groups(
    sessions: sessionmaker[Session], settings: Settings, name: str
) -> list[str]:
    """Check a cloud environment's security groups again (after an admin changed them, or
    for one defined before Labpool checked them; one without groups gets its own) and
    store the ids. Refused: EnvironmentRejected, and the stored groups stay as they were."""
    from provisioning.backends.security_groups import secure_ide_port

    with sessions() as session:
        environment = session.scalars(select(Environment).where(Environment.name == name)).first()
        if environment is None or not _can(environment.backend).security_groups:
            raise EnvironmentRejected(f"no cloud environment named {name!r}")
        groups, ide_port = list(environment.security_groups or []), environment.ide_port
    try:
        ids = secure_ide_port(
            _cloud(settings),
            environment_name=name,
            groups=groups,
            ide_port=ide_port,
            proxy_addresses=settings.proxy_addresses,
        )
    except ProvisioningError as exc:
        raise EnvironmentRejected(f"environment {name!r}: {exc}") from exc
    with transaction(sessions) as session:
        environment = session.scalars(select(Environment).where(Environment.name == name)).one()
        environment.security_groups = ids
    return ids


def _can(backend: str) -> Capabilities:
    entry = BACKENDS.get(backend)
    if entry is None:  # a row written by a version that had this backend
        raise EnvironmentRejected(f"backend {backend!r} is not available here")
    return entry.capabilities


def _cloud(settings: Settings) -> Any:
    """The cloud, for its security groups only (no image or flavor needed)."""
    from provisioning.backends.openstack import CloudSpec, OpenStackBackend

    return OpenStackBackend(
        settings.openstack_cloud,
        CloudSpec("", "", ""),
        api_timeout=settings.openstack_api_timeout_s,
    )


def _check_pool_sizes(warm_target: int, max_size: int) -> None:
    if warm_target < 0 or max_size < 1 or warm_target > max_size:
        raise EnvironmentRejected(
            f"need 0 ≤ warm target ≤ max size and max size ≥ 1 (got {warm_target} and {max_size})"
        )


def set_pool(
    session: Session,
    env_name: str,
    *,
    warm_target: int | None = None,
    max_size: int | None = None,
    paused: bool | None = None,
) -> Pool:
    pool = session.scalars(
        select(Pool)
        .join(Environment, Environment.id == Pool.environment_id)
        .where(Environment.name == env_name)
    ).one_or_none()
    if pool is None:
        raise EnvironmentRejected(f"no cloud environment named {env_name!r}")
    new_target = pool.warm_target if warm_target is None else warm_target
    new_max = pool.max_size if max_size is None else max_size
    _check_pool_sizes(new_target, new_max)
    pool.warm_target, pool.max_size = new_target, new_max
    if paused is not None:
        pool.paused = paused
    session.flush()
    return pool


LIMIT_FIELDS = tuple(LIMIT_FLOORS)
MIN_IDLE_TIMEOUT_S = 60


@dataclass
class EnvironmentEdit:
    """What `edit_environment` changed, and the rolling it started."""

    name: str
    changed: list[str] = field(default_factory=list)
    pool_id: int | None = None
    rolling_warm: int = 0  # warm machines on the old image/flavor: replaced at the next pass
    rolling_assigned: int = 0  # students' machines on it: replaced when released

    def summary(self) -> str:
        text = f"environment {self.name}: {', '.join(self.changed)} changed"
        if self.rolling_warm or self.rolling_assigned:
            text += (
                f"; the pool rolls: {self.rolling_warm} warm machine(s) replaced now, "
                f"{self.rolling_assigned} student machine(s) when released"
            )
        return text


def edit_environment(
    session: Session,
    name: str,
    *,
    idle_timeout_s: int | None = None,
    warm_target: int | None = None,
    max_size: int | None = None,
    image_id: str | None = None,
    flavor_id: str | None = None,
    **limits: int | None,
) -> EnvironmentEdit:
    """Change an environment (`labpool env edit` and the admin page). None leaves a value as
    it is. Refused (EnvironmentRejected, nothing changed) for an unknown environment, a
    value out of range, a pool setting of an environment without a pool, or an image or
    flavor of one that boots none.

    A new image or flavor of a pooled environment rolls its pool: machines booted before
    (their `backend_ref` records what they booted, written here for older ones) are
    replaced: warm ones by the reconciler's next pass (`decide_roll`), students' ones when
    they are released (a released machine is stopped, never reused). The caller triggers
    that pass once this transaction is committed (`pool_id`)."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise EnvironmentRejected(f"no such setting: {', '.join(sorted(unknown))}")
    environment = session.scalars(
        select(Environment).where(Environment.name == name).with_for_update()
    ).one_or_none()
    if environment is None:
        raise EnvironmentRejected(f"no environment named {name!r}")
    can = _can(environment.backend)
    pool = session.scalars(select(Pool).where(Pool.environment_id == environment.id)).first()
    edit = EnvironmentEdit(environment.name, pool_id=pool.id if pool else None)

    if idle_timeout_s is not None and idle_timeout_s < MIN_IDLE_TIMEOUT_S:
        raise EnvironmentRejected(
            f"idle timeout must be at least {MIN_IDLE_TIMEOUT_S} s, not {idle_timeout_s}"
        )
    if (warm_target is not None or max_size is not None) and pool is None:
        raise EnvironmentRejected(
            f"environment {name!r} ({environment.backend}) has no pool: no warm target or max size"
        )
    booted = {f for f, _ in can.needs}
    for label, value, column in (
        ("image", image_id, "image_id"),
        ("flavor", flavor_id, "flavor_id"),
    ):
        if value is None:
            continue
        if column not in booted:
            raise EnvironmentRejected(
                f"environment {name!r} ({environment.backend}) boots no {label}"
            )
        if not value.strip():
            raise EnvironmentRejected(f"the {label} id must not be empty")
    _check_lengths(
        image_id=image_id.strip() if image_id is not None else None,
        flavor_id=flavor_id.strip() if flavor_id is not None else None,
    )
    given_limits = {k: v for k, v in limits.items() if v is not None}
    _check_limits(given_limits)
    if pool is not None and (warm_target is not None or max_size is not None):
        new_target = pool.warm_target if warm_target is None else warm_target
        new_max = pool.max_size if max_size is None else max_size
        _check_pool_sizes(new_target, new_max)

    old_image, old_flavor = environment.image_id, environment.flavor_id
    for column, value in (
        ("idle_timeout_s", idle_timeout_s),
        ("image_id", image_id.strip() if image_id is not None else None),
        ("flavor_id", flavor_id.strip() if flavor_id is not None else None),
        *given_limits.items(),
    ):
        if value is not None and getattr(environment, column) != value:
            setattr(environment, column, value)
            edit.changed.append(column)
    if pool is not None:
        for column, value in (("warm_target", warm_target), ("max_size", max_size)):
            if value is not None and getattr(pool, column) != value:
                setattr(pool, column, value)
                edit.changed.append(column)
    if not edit.changed:
        raise EnvironmentRejected(f"environment {name!r}: nothing to change")

    if pool is not None and ("image_id" in edit.changed or "flavor_id" in edit.changed):
        from provisioning.reconcile_decisions import on_old_spec

        live = session.scalars(
            select(Machine).where(
                Machine.environment_id == environment.id,
                Machine.state.in_(
                    [MachineState.starting, MachineState.ready, MachineState.assigned]
                ),
            )
        ).all()
        for machine in live:
            ref = dict(machine.backend_ref or {})
            if "image_id" not in ref and "flavor_id" not in ref:
                # Booted before machines recorded their image: it is the old one.
                machine.backend_ref = {**ref, "image_id": old_image, "flavor_id": old_flavor}
                ref = machine.backend_ref
            if on_old_spec(ref, environment.image_id, environment.flavor_id):
                if machine.owner_id is None and machine.state is not MachineState.assigned:
                    edit.rolling_warm += 1
                else:
                    edit.rolling_assigned += 1
    session.flush()
    return edit


def retire_environment(session: Session, name: str, *, retired: bool = True) -> Environment:
    """Retire an environment (`labpool env retire`, the admin page): launches onto it start
    no new machine and say why, teachers can no longer pick it, its pool keeps no warm
    machines; machines already handed out run until they are released. `retired=False`
    takes it back into use. The `default` environment (every unconfigured activity's)
    cannot be retired."""
    environment = session.scalars(
        select(Environment).where(Environment.name == name).with_for_update()
    ).one_or_none()
    if environment is None:
        raise EnvironmentRejected(f"no environment named {name!r}")
    if retired and environment.name == "default":
        raise EnvironmentRejected(
            "the default environment is every unconfigured activity's: it cannot be retired "
            "(edit it instead)"
        )
    environment.retired_at = (environment.retired_at or utcnow()) if retired else None
    return environment
