"""an environment can be limited to some courses (environment_courses); open to all by default

`environments.limited_to_courses`: set while an admin limits the environment to the courses
listed in `environment_courses` (only their teachers may pick it, only their launches start
machines of it); false (every existing row): open to every course, as before.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-01 11:30:00

"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0016"
down_revision: Union[str, Sequence[str], None] = "0015"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # Plain ALTER TABLE on both databases (SQLite has ADD and DROP COLUMN): a batch operation
    # would copy and drop `environments`, which SQLite refuses while foreign keys are on
    # (config.db turns them on) and other rows (activities, machines) refer to it.
    op.add_column(
        "environments",
        sa.Column("limited_to_courses", sa.Boolean(), nullable=False, server_default="0"),
    )
    op.create_table(
        "environment_courses",
        sa.Column("environment_id", sa.Integer(), nullable=False),
        sa.Column("course_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["environment_id"], ["environments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["course_id"], ["courses.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("environment_id", "course_id"),
    )
    op.create_index(
        "ix_environment_courses_course", "environment_courses", ["course_id"], unique=False
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_environment_courses_course", table_name="environment_courses")
    op.drop_table("environment_courses")
    op.drop_column("environments", "limited_to_courses")
