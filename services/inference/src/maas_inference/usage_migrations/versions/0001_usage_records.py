"""usage_records: one row per metered call (or data plane group of calls)

Revision ID: 0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "usage_records",
        sa.Column("pk", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("principal", sa.String(256), nullable=False),
        sa.Column("deployment", sa.String(63), nullable=False),
        sa.Column("version", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_seconds", sa.Float(), nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("rows", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_usage_tenant_start", "usage_records", ["tenant", "start_time"])
    op.create_index("ix_usage_deployment_start", "usage_records", ["deployment", "start_time"])
    op.create_index("ix_usage_start", "usage_records", ["start_time"])


def downgrade() -> None:
    op.drop_table("usage_records")
