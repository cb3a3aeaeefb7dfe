"""tenant_minute_usage and tenant_stream_leases: minute windows and concurrent streams that
replicas on one database share (maas_inference.shared_limits)

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_minute_usage",
        sa.Column("tenant", sa.String(256), primary_key=True),
        sa.Column("second", sa.BigInteger(), primary_key=True),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("tokens", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_table(
        "tenant_stream_leases",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(256), nullable=False),
        sa.Column("replica", sa.String(256), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_stream_leases_tenant_expiry", "tenant_stream_leases",
                    ["tenant", "expires_at"])


def downgrade() -> None:
    op.drop_table("tenant_stream_leases")
    op.drop_table("tenant_minute_usage")
