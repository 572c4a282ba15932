"""pools and cloud environments

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 02:40:38.258176

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "pools",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("environment_id", sa.Integer(), nullable=False),
        sa.Column("warm_target", sa.Integer(), nullable=False),
        sa.Column("max_size", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("quota_note", sa.Text(), nullable=True),
        sa.Column("hold_note", sa.Text(), nullable=True),
        sa.Column("backoff_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("last_pass_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["environment_id"],
            ["environments.id"],
            name=op.f("fk_pools_environment_id_environments"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pools")),
        sa.UniqueConstraint("environment_id", name=op.f("uq_pools_environment_id")),
    )
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("flavor_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("network_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("network_name", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("security_groups", sa.JSON(), nullable=False, server_default="[]")
        )
        batch_op.add_column(sa.Column("key_name", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("volume_size_gb", sa.Integer(), nullable=False, server_default="10")
        )
        batch_op.add_column(
            sa.Column("ide_port", sa.Integer(), nullable=False, server_default="8888")
        )


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("environments", schema=None) as batch_op:
        batch_op.drop_column("ide_port")
        batch_op.drop_column("volume_size_gb")
        batch_op.drop_column("key_name")
        batch_op.drop_column("security_groups")
        batch_op.drop_column("network_name")
        batch_op.drop_column("network_id")
        batch_op.drop_column("flavor_id")
        batch_op.drop_column("image_id")

    op.drop_table("pools")
