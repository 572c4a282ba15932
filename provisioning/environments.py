"""Environments (what a machine runs) and their pools (how many are kept warm), as an admin
defines them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from provisioning.models import Environment, IdeKind, Pool


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
) -> Environment:
    """Define an environment; a cloud environment gets its pool at once."""
    if not name.strip():
        raise EnvironmentRejected("the environment needs a name")
    if backend not in ("local", "openstack"):
        raise EnvironmentRejected(f"backend must be 'local' or 'openstack', not {backend!r}")
    try:
        kind = IdeKind(ide_kind)
    except ValueError:
        kinds = ", ".join(k.value for k in IdeKind)
        raise EnvironmentRejected(f"IDE must be one of {kinds}, not {ide_kind!r}") from None
    if backend == "openstack":
        missing = [flag for flag, value in (("--image", image_id), ("--flavor", flavor_id),
                                            ("--network", network_id)) if not value]
        if missing:
            raise EnvironmentRejected(f"an openstack environment needs {', '.join(missing)}")
    if session.scalar(select(Environment.id).where(Environment.name == name)) is not None:
        raise EnvironmentRejected(f"an environment named {name!r} exists already")
    _check_pool_sizes(warm_target, max_size)
    env = Environment(
        name=name, backend=backend, ide_kind=kind, image_id=image_id, flavor_id=flavor_id,
        network_id=network_id, network_name=network_name, security_groups=security_groups or [],
        key_name=key_name, volume_size_gb=volume_size_gb, idle_timeout_s=idle_timeout_s,
    )
    session.add(env)
    session.flush()
    if backend == "openstack":
        session.add(Pool(environment_id=env.id, warm_target=warm_target, max_size=max_size))
        session.flush()
    return env


def _check_pool_sizes(warm_target: int, max_size: int) -> None:
    if warm_target < 0 or max_size < 1 or warm_target > max_size:
        raise EnvironmentRejected(
            f"need 0 ≤ warm target ≤ max size and max size ≥ 1 (got {warm_target} and {max_size})"
        )


def set_pool(
    session: Session, env_name: str, *, warm_target: int | None = None,
    max_size: int | None = None, paused: bool | None = None,
) -> Pool:
    pool = session.scalars(
        select(Pool).join(Environment, Environment.id == Pool.environment_id)
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
