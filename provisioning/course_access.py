"""Which courses may use an environment (issue 14's admin page): every course (the default,
and every environment defined before this existed), or only the courses an admin lists.

Enforced on the server wherever an environment gets chosen or starts a machine: the teacher's
picker on the class page and the deep-linking selection list only what the course may use
and refuse anything else; `provisioning.claiming.machine_for_learner` starts no machine of an
environment the course may not use (a launch of an activity whose environment was limited
away from its course, or whose deep-linking custom parameter names such an environment, is
refused and says why), while a machine already handed out stays until it is released, as
with a retired environment. The `default` environment stays open to every course.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, select
from sqlalchemy.orm import Session

from provisioning.environments import EnvironmentRejected
from provisioning.models import Environment, EnvironmentCourse

ROW_ID_MAX = 2**31 - 1  # the id columns are INTEGERs: a larger id names no row


def open_to_course(course_id: int) -> ColumnElement[bool]:
    """SQL: the environment is open to every course, or lists this one."""
    return Environment.limited_to_courses.is_(False) | Environment.id.in_(
        select(EnvironmentCourse.environment_id).where(EnvironmentCourse.course_id == course_id)
    )


def may_use(session: Session, environment: Environment, course_id: int | None) -> bool:
    """Whether the course may use the environment (pick it, start machines of it). Costs a
    query only for a limited environment. No course: only environments open to all."""
    if not environment.limited_to_courses:
        return True
    if course_id is None:
        return False
    listed = session.scalar(
        select(EnvironmentCourse.course_id).where(
            EnvironmentCourse.environment_id == environment.id,
            EnvironmentCourse.course_id == course_id,
        )
    )
    return listed is not None


def environments_for_course(session: Session, course_id: int) -> list[Environment]:
    """What a teacher of the course may pick for an activity: the environments in use (not
    retired) and open to the course, by name."""
    return list(
        session.scalars(
            select(Environment)
            .where(Environment.retired_at.is_(None), open_to_course(course_id))
            .order_by(Environment.name)
        )
    )


def course_title(title: str, label: str, context_id: str) -> str:
    """A course as an admin recognises it: its title, else its short name, else its id."""
    return title or label or context_id or "(launches without a course)"


@dataclass
class CourseAccess:
    """Which courses may use an environment, as `set_environment_courses` left it."""

    name: str
    courses: list[tuple[int, str]] | None  # (course id, title); None: every course
    elsewhere: int = 0  # activities of other courses on it: their launches are now refused

    def summary(self) -> str:
        if self.courses is None:
            return f"environment {self.name}: open to every course"
        text = f"environment {self.name}: only for " + ", ".join(
            f"course {course_id} ({title})" for course_id, title in self.courses
        )
        if self.elsewhere:
            text += (
                f"; {self.elsewhere} activity(ies) of other courses use it: their launches "
                "start no new machine until their teacher picks another environment"
            )
        return text


def set_environment_courses(
    session: Session, name: str, course_ids: Iterable[int] | None
) -> CourseAccess:
    """Open an environment to every course (`course_ids` None) or limit it to the given
    courses (`labpool env courses`, the admin page; ids as `labpool courses list` shows
    them). Refused (EnvironmentRejected, nothing changed) for an unknown environment, the
    `default` one (every unconfigured activity's), an empty list, or ids that name no
    course (all of them said). Web processes see the change within their 10 s cache of
    environments (`lti_tool.launches.cached_environment`)."""
    from lti_tool.models import Activity, Course

    environment = session.scalars(
        select(Environment).where(Environment.name == name).with_for_update()
    ).one_or_none()
    if environment is None:
        raise EnvironmentRejected(f"no environment named {name!r}")
    if course_ids is None:
        environment.limited_to_courses = False
        session.execute(
            delete(EnvironmentCourse).where(EnvironmentCourse.environment_id == environment.id)
        )
        session.flush()
        return CourseAccess(environment.name, None)
    if environment.name == "default":
        raise EnvironmentRejected(
            "the default environment is every unconfigured activity's: it stays open to "
            "every course (limit another environment instead)"
        )
    wanted = sorted(set(course_ids))
    if not wanted:
        raise EnvironmentRejected(
            f"name at least one course for environment {name!r}, or open it to every course"
        )
    found = {
        course_id: course_title(title, label, context_id)
        for course_id, title, label, context_id in session.execute(
            select(Course.id, Course.title, Course.label, Course.context_id).where(
                Course.id.in_([i for i in wanted if 0 < i <= ROW_ID_MAX])
            )
        )
    }
    unknown = [i for i in wanted if i not in found]
    if unknown:
        raise EnvironmentRejected(
            f"no course with id {', '.join(str(i) for i in unknown)} "
            "(`labpool courses list` shows the courses and their ids)"
        )
    environment.limited_to_courses = True
    session.execute(
        delete(EnvironmentCourse).where(
            EnvironmentCourse.environment_id == environment.id,
            EnvironmentCourse.course_id.notin_(wanted),
        )
    )
    kept = set(
        session.scalars(
            select(EnvironmentCourse.course_id).where(
                EnvironmentCourse.environment_id == environment.id
            )
        )
    )
    session.add_all(
        EnvironmentCourse(environment_id=environment.id, course_id=i)
        for i in wanted
        if i not in kept
    )
    session.flush()
    elsewhere = session.scalar(
        select(func.count()).where(
            Activity.environment_id == environment.id, Activity.course_id.notin_(wanted)
        )
    )
    return CourseAccess(environment.name, [(i, found[i]) for i in wanted], elsewhere or 0)


def courses_of(session: Session, environment_ids: Iterable[int]) -> dict[int, list[int]]:
    """The courses each of these environments lists (an environment open to all lists none)."""
    listed: dict[int, list[int]] = {}
    for environment_id, course_id in session.execute(
        select(EnvironmentCourse.environment_id, EnvironmentCourse.course_id)
        .where(EnvironmentCourse.environment_id.in_(list(environment_ids)))
        .order_by(EnvironmentCourse.course_id)
    ):
        listed.setdefault(environment_id, []).append(course_id)
    return listed
