"""spans: every service's OpenTelemetry spans, stored by the exporter from the spans topic

Revision ID: 0005_spans
Revises: 0004
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005_spans"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "spans",
        sa.Column("trace_id", sa.String(32), primary_key=True, comment="W3C trace id, 32 hex digits"),
        sa.Column("span_id", sa.String(16), primary_key=True, comment="16 hex digits"),
        sa.Column("parent_span_id", sa.String(16), nullable=True, comment="None: the root of its trace"),
        sa.Column("service", sa.String(200), nullable=False, comment="Resource attribute service.name"),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, comment="internal, server, client, producer or consumer"),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Float, nullable=False),
        sa.Column("status_code", sa.String(8), nullable=False, comment="unset, ok or error"),
        sa.Column("status_message", sa.Text, nullable=True),
        sa.Column("attributes", postgresql.JSONB, nullable=False),
        sa.Column("events", postgresql.JSONB, nullable=False, server_default="[]"),
        sa.Column("links", postgresql.JSONB, nullable=False, server_default="[]", comment="[{trace_id, span_id}]"),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_spans_service", "spans", ["service"])
    op.create_index("ix_spans_start_time", "spans", ["start_time"])


def downgrade() -> None:
    op.drop_table("spans")
