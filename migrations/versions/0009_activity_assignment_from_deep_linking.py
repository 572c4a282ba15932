"""the assignment a deep-linked activity delivers

A teacher who adds Labpool with Moodle's "Select content" (LTI Deep Linking 2.0) may pick one
of the course's assignments; the content item's custom parameter `labpool_assignment` comes
back in the new activity's launches, and the first launch records it here (the environment
goes into the existing `environment_id`). SET NULL when the assignment is deleted: the
activity then delivers its environment only.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 06:40:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: Union[str, Sequence[str], None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("activities", schema=None) as batch_op:
        batch_op.add_column(sa.Column("assignment_id", sa.Integer(), nullable=True))
        batch_op.create_foreign_key(
            batch_op.f("fk_activities_assignment_id_assignments"),
            "assignments",
            ["assignment_id"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("activities", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_activities_assignment_id_assignments"), type_="foreignkey"
        )
        batch_op.drop_column("assignment_id")
