"""job leases: the replica running a job, until when, and whether it is publishing

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
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(256)))
        batch.add_column(sa.Column("lease_expires", sa.DateTime(timezone=True)))
        batch.add_column(sa.Column("publishing", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("publishing")
        batch.drop_column("lease_owner")
        batch.drop_column("lease_expires")
