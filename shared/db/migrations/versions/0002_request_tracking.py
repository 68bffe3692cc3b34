"""request tracking: trace id of requests, attempts and routing reasons of results, feedback

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("requests", sa.Column("trace_id", sa.String(32)))
    op.add_column("results", sa.Column("attempts", sa.Integer, server_default="1", nullable=False))
    op.add_column(
        "results", sa.Column("reasons", postgresql.JSONB, server_default=sa.text("'[]'::jsonb"), nullable=False)
    )
    op.create_table(
        "feedback",
        sa.Column("feedback_id", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("caller", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])


def downgrade() -> None:
    op.drop_table("feedback")
    op.drop_column("results", "reasons")
    op.drop_column("results", "attempts")
    op.drop_column("requests", "trace_id")
