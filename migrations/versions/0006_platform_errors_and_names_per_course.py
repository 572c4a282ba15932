"""platform-call status on courses, names per enrolment

Courses remember their last successful roster sync and the last failed call to the platform
(what failed and what to do), so the teacher's class page can say so. Enrolments carry the
name and email as the course's own registration shared them: a registration that does not
share names must never show names learned through another registration of the same issuer.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 11:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: Union[str, Sequence[str], None] = "0005"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("courses", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("roster_synced_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("platform_error", sa.Text(), nullable=True))
        batch_op.add_column(
            sa.Column("platform_error_at", sa.DateTime(timezone=True), nullable=True)
        )
    with op.batch_alter_table("enrolments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("name", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("email", sa.String(length=255), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("enrolments", schema=None) as batch_op:
        batch_op.drop_column("email")
        batch_op.drop_column("name")
    with op.batch_alter_table("courses", schema=None) as batch_op:
        batch_op.drop_column("platform_error_at")
        batch_op.drop_column("platform_error")
        batch_op.drop_column("roster_synced_at")
