"""requests and results

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("deadline", sa.DateTime(timezone=True)),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("caller", sa.String(200)),
        sa.Column("end_user", sa.String(200)),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("messages", postgresql.JSONB, nullable=False),
        sa.Column("params", postgresql.JSONB, nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_requests_created_at", "requests", ["created_at"])
    op.create_table(
        "results",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("model", sa.String(200)),
        sa.Column("pool", sa.String(100)),
        sa.Column("score", sa.Float),
        sa.Column("content", sa.Text),
        sa.Column("finish_reason", sa.String(16)),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("queue_ms", sa.Float, nullable=False),
        sa.Column("inference_ms", sa.Float, nullable=False),
        sa.Column("total_ms", sa.Float, nullable=False),
        sa.Column("batch_size", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(100)),
        sa.Column("error_code", sa.String(100)),
        sa.Column("error_message", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    )
    op.create_index("ix_results_status", "results", ["status"])
    op.create_index("ix_results_model", "results", ["model"])
    op.create_index("ix_results_completed_at", "results", ["completed_at"])


def downgrade() -> None:
    op.drop_table("results")
    op.drop_table("requests")
