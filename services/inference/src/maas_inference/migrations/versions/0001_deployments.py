"""deployments: each deployment's record as JSON

Revision ID: 0001
Revises:

Deployment tables made before migrations existed (SQLite files the service wrote with
sqlite3: the same columns, JSON kept as text) are adopted as they are.
"""
import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("deployments"):
        return
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(63), primary_key=True),
        sa.Column("record", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("deployments")
