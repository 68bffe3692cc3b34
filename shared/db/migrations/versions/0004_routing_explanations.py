"""routing explanations: the router's decision (policy, score, threshold, contributions) on each result

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("results", sa.Column("routing", postgresql.JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("results", "routing")
