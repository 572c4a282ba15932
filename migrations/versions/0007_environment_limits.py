"""per-machine limits of an environment (local backend)

Each machine of the local backend runs in a sandbox with resource limits; they are the
environment's settings: address space per process, tasks of the student's user, open files,
the largest file, and CPU seconds per process (0: no limit).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0007"
down_revision: Union[str, Sequence[str], None] = "0006"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

COLUMNS = (
    ("memory_mb", "2048"),
    ("max_processes", "256"),
    ("max_open_files", "1024"),
    ("max_file_size_mb", "1024"),
    ("cpu_seconds", "0"),
)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("environments", schema=None) as batch_op:
        for name, default in COLUMNS:
            batch_op.add_column(
                sa.Column(name, sa.Integer(), nullable=False, server_default=default)
            )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("environments", schema=None) as batch_op:
        for name, _ in reversed(COLUMNS):
            batch_op.drop_column(name)
