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
    # Plain ADD COLUMN, never batch mode: on SQLite a batch copy drops the old `jobs` table,
    # and with foreign keys on that deletes every job's events through ON DELETE CASCADE.
    op.add_column("jobs", sa.Column("lease_owner", sa.String(256)))
    op.add_column("jobs", sa.Column("lease_expires", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("publishing", sa.Boolean(), nullable=False,
                                    server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("publishing")
        batch.drop_column("lease_owner")
        batch.drop_column("lease_expires")
