"""studies.issuer_of_patient_id: a study's patient is Patient ID with its issuer (identity conflicts)

Studies recorded before this revision have no issuer: only their Patient ID is compared.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("issuer_of_patient_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("studies") as batch:
        batch.drop_column("issuer_of_patient_id")
