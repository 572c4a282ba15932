"""autograding: results per submitted version, the assignment's "auto-grade on submit"

One row per submission the autograder owes or gave a grade (unique per submission: a re-run
of the same version updates it); `auto_grade_on_submit` on assignments, off by default.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-01 09:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0013"
down_revision: Union[str, Sequence[str], None] = "0012"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("auto_grade_on_submit", sa.Boolean(), nullable=False, server_default="0")
        )
    op.create_table(
        "autograde_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("submission_id", sa.Integer(), nullable=False),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "running",
                "done",
                "failed",
                name="autogradestate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("max_score", sa.Float(), nullable=True),
        sa.Column("cells", sa.JSON(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("feedback_html", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("seconds", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["submission_id"], ["submissions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["assignment_id"], ["assignments.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("submission_id"),
    )
    op.create_index("ix_autograde_results_assignment_id", "autograde_results", ["assignment_id"])
    op.create_index("ix_autograde_results_user_id", "autograde_results", ["user_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_autograde_results_user_id", table_name="autograde_results")
    op.drop_index("ix_autograde_results_assignment_id", table_name="autograde_results")
    op.drop_table("autograde_results")
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("auto_grade_on_submit")
