"""events: routing decisions, retries, dead letters and cancellations; indexes for retention and the leaderboard

Revision ID: 0006_events
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_events"
down_revision = "0005_spans"
branch_labels = None
depends_on = None


def stored_at() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("stored_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "routing_decisions",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("pool", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("lane", sa.String(16), nullable=False),
        sa.Column("score", sa.Float, nullable=False),
        sa.Column("policy", sa.String(32)),
        sa.Column("reasons", postgresql.JSONB, nullable=False),
        sa.Column("routing", postgresql.JSONB),
        sa.Column("routed_at", sa.DateTime(timezone=True), nullable=False),
        stored_at(),
    )
    op.create_index("ix_routing_decisions_routed_at", "routing_decisions", ["routed_at"])
    op.create_table(
        "retries",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("pool", sa.String(100), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("not_before", sa.DateTime(timezone=True)),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=False),
        stored_at(),
    )
    op.create_index("ix_retries_scheduled_at", "retries", ["scheduled_at"])
    op.create_table(
        "dead_letters",
        sa.Column("kafka_partition", sa.Integer, primary_key=True),
        sa.Column("kafka_offset", sa.BigInteger, primary_key=True),
        sa.Column("request_id", sa.String(128)),
        sa.Column("source_topic", sa.String(255), nullable=False),
        sa.Column("service", sa.String(100), nullable=False),
        sa.Column("error_type", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
        stored_at(),
    )
    op.create_index("ix_dead_letters_request_id", "dead_letters", ["request_id"])
    op.create_index("ix_dead_letters_failed_at", "dead_letters", ["failed_at"])
    op.create_table(
        "cancellations",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("requested_by", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        stored_at(),
    )
    op.create_index("ix_cancellations_created_at", "cancellations", ["created_at"])
    op.create_index("ix_feedback_created_at", "feedback", ["created_at"])  # the retention purge's range


def downgrade() -> None:
    op.drop_index("ix_feedback_created_at", "feedback")
    op.drop_table("cancellations")
    op.drop_table("dead_letters")
    op.drop_table("retries")
    op.drop_table("routing_decisions")
