"""what each student last received of an assignment

One row per (assignment, student): the student version they got (the release folder's name)
and the checksum of every file placed in their home, which tells the next release whether a
file is still untouched (nbgitpuller's rule, grading/release.py). On the tool's side, where
the student cannot change it.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 06:45:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0010"
down_revision: Union[str, Sequence[str], None] = "0009"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "assignment_releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=128), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["assignment_id"],
            ["assignments.id"],
            name=op.f("fk_assignment_releases_assignment_id_assignments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_assignment_releases_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_assignment_releases")),
        sa.UniqueConstraint(
            "assignment_id", "user_id", name=op.f("uq_assignment_releases_assignment_id")
        ),
    )
    with op.batch_alter_table("assignment_releases", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_assignment_releases_user_id"), ["user_id"], unique=False
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("assignment_releases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_assignment_releases_user_id"))
    op.drop_table("assignment_releases")
