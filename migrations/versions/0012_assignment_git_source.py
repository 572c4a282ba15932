"""where a git-sourced assignment's files come from

An assignment may take its files from a folder of a branch of a git repository (https only)
instead of an upload; the URL, branch and folder are kept so that "Fetch again" can refresh
them. NULL for uploaded assignments.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-01 07:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0012"
down_revision: Union[str, Sequence[str], None] = "0011"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("git_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("git_branch", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("git_folder", sa.Text(), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("assignments", schema=None) as batch_op:
        batch_op.drop_column("git_folder")
        batch_op.drop_column("git_branch")
        batch_op.drop_column("git_url")
