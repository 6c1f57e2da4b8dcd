"""remotes: the links an account pulls from

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 10:05:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import shlhost.storage.models

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('remotes',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('url', sa.String(length=500), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=False),
    sa.Column('label', sa.String(length=80), nullable=True),
    sa.Column('flag', sa.String(length=8), nullable=False),
    sa.Column('last_pulled', shlhost.storage.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('last_file_updates', sa.Text(), nullable=True),
    sa.Column('created_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_remotes_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_remotes')),
    sa.UniqueConstraint('account_id', 'url', name='uq_remotes_account_id_url')
    )


def downgrade() -> None:
    op.drop_table('remotes')
