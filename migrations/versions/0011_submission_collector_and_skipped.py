"""submissions: who collected a copy, and what the copy left out

A teacher's "collect now" stores copies of the students' folders like their own "Submit"
does; `collected_by` names the teacher (NULL: the student submitted it; SET NULL when the
teacher's user goes). `skipped` is the receipt's list of what was not copied (symbolic
links, FIFOs, caches…), JSON text (grading/submissions.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 07:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0011"
down_revision: Union[str, Sequence[str], None] = "0010"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("collected_by", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("skipped", sa.Text(), nullable=False, server_default="[]"))
        batch_op.create_foreign_key(
            batch_op.f("fk_submissions_collected_by_users"),
            "users",
            ["collected_by"],
            ["id"],
            ondelete="SET NULL",
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("submissions", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_submissions_collected_by_users"), type_="foreignkey"
        )
        batch_op.drop_column("skipped")
        batch_op.drop_column("collected_by")
