"""warm boosts per activity

A teacher's "warm now" was one boost per pool, so a teacher of another course on the same
pool replaced it. Boosts become rows per activity (`warm_boosts`); the pool wants the
largest unexpired one. An unexpired per-pool boost is not carried over: it lives at most two
hours, and a teacher can press "warm now" again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 10:00:00

"""

from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "warm_boosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("activity_id", sa.Integer(), nullable=False),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("until", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["activity_id"],
            ["activities.id"],
            name=op.f("fk_warm_boosts_activity_id_activities"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_warm_boosts")),
        sa.UniqueConstraint("activity_id", name=op.f("uq_warm_boosts_activity_id")),
    )
    with op.batch_alter_table("pools", schema=None) as batch_op:
        batch_op.drop_column("boost_until")
        batch_op.drop_column("boost_target")


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table("pools", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("boost_target", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("boost_until", sa.DateTime(timezone=True), nullable=True))
    op.drop_table("warm_boosts")
