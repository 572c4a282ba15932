"""Assignments of an activity: listing them, and (see grading.release) what students get."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from grading.models import Assignment


def activity_assignments(session: Session, activity_id: int) -> list[Assignment]:
    """The activity's assignments, oldest first (the first one owns the activity's line item)."""
    return list(
        session.scalars(
            select(Assignment).where(Assignment.activity_id == activity_id).order_by(Assignment.id)
        )
    )
