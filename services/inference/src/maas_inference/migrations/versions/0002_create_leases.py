"""create leases: the replica creating a deployment, until when, and how often it was interrupted

Revision ID: 0002
Revises: 0001

A deployment is CREATING while one replica loads it; a replica that dies mid-create left it
CREATING for good. The creating replica now holds a lease it renews while it loads; another
replica takes a lapsed one over (`maas_inference.store`).
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy of the table on SQLite).
    op.add_column("deployments", sa.Column("create_lease_owner", sa.String(64)))
    op.add_column("deployments", sa.Column("create_lease_expires", sa.DateTime(timezone=True)))
    op.add_column("deployments", sa.Column("create_interruptions", sa.Integer(), nullable=False,
                                           server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("create_interruptions")
        batch.drop_column("create_lease_expires")
        batch.drop_column("create_lease_owner")
