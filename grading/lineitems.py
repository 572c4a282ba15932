"""Which platform grade item (AGS line item) an assignment's scores go to.

The activity's own line item (the launch's AGS claim `lineitem`, present when the Moodle
activity has a grade item — deep linking creates one) belongs to the activity's first
assignment. Any other assignment, or an activity without one, gets a line item of its own
in the activity's `lineitems` container, found by its `resourceId` or created — only if the
claim's scope allows managing line items (Moodle: "IMS LTI Assignment and Grade Services" set
to "Use this service for grade sync and column management").
"""

from __future__ import annotations

from sqlalchemy import update

from config.db import transaction
from config.runtime import Runtime
from grading.grades import known_lineitem
from grading.models import Assignment, ScoreOutbox, ScoreStatus
from lti_tool.deep_linking import assignment_resource_id
from lti_tool.models import Activity
from lti_tool.services.ags import AgsClient


class LineItemMissing(Exception):
    """No grade item to send to, and none can be made: the teacher's (or admin's) to fix."""


def resource_id(assignment: Assignment) -> str:
    return assignment_resource_id(assignment.id)


def resolve_lineitem(rt: Runtime, client: AgsClient, assignment_id: int) -> str:
    """The assignment's line item URL, asking the platform only when it is not known; pending
    outbox rows without one get it."""
    with rt.sessions() as session:
        assignment = session.get_one(Assignment, assignment_id)
        activity = session.get_one(Activity, assignment.activity_id)
        url = known_lineitem(session, assignment, activity)
        lineitems, link_id = activity.ags_lineitems, activity.resource_link_id
        label = assignment.title or assignment.name
        rid, maximum = resource_id(assignment), assignment.max_score
    if url is None:
        if not lineitems or not client.can_manage_lineitems():
            raise LineItemMissing(
                "the platform gave this activity no grade item and does not let Labpool "
                "create one: in Moodle, turn on grades for the activity (or set the tool's "
                "“IMS LTI Assignment and Grade Services” to grade sync and column "
                "management), open the activity once, then press “send again”"
            )
        url = client.find_or_create_lineitem(
            lineitems, resource_id=rid, label=label, score_maximum=maximum, resource_link_id=link_id
        )
    with transaction(rt.sessions) as session:
        assignment = session.get_one(Assignment, assignment_id)
        if assignment.lineitem_url is None and url != activity.ags_lineitem:
            assignment.lineitem_url = url
        session.execute(
            update(ScoreOutbox)
            .where(
                ScoreOutbox.assignment_id == assignment_id,
                ScoreOutbox.status == ScoreStatus.pending,
                ScoreOutbox.lineitem_url.is_(None),
            )
            .values(lineitem_url=url)
            .execution_options(synchronize_session=False)
        )
    return url
