"""accounts, api tokens and the versioned record store

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 08:56:11.003818
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import shlhost.storage.models

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('email', sa.String(length=254), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('email', name=op.f('uq_accounts_email'))
    )
    op.create_table('api_tokens',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('token_hash', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=80), nullable=True),
    sa.Column('created_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_api_tokens_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_tokens')),
    sa.UniqueConstraint('token_hash', name=op.f('uq_api_tokens_token_hash'))
    )
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_tokens_account_id'), ['account_id'], unique=False)

    op.create_table('imports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('created_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=500), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('counts', sa.Text(), nullable=False),
    sa.Column('provenance_id', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_imports_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_imports'))
    )
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_imports_account_id'), ['account_id'], unique=False)

    op.create_table('resource_identifiers',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('system', sa.String(length=255), nullable=False),
    sa.Column('value', sa.String(length=255), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_resource_identifiers_account_id_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('account_id', 'resource_type', 'resource_id', 'system', 'value', name=op.f('pk_resource_identifiers'))
    )
    with op.batch_alter_table('resource_identifiers', schema=None) as batch_op:
        batch_op.create_index('ix_resource_identifiers_lookup', ['account_id', 'resource_type', 'system', 'value'], unique=False)

    op.create_table('conflicts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('stored_version', sa.Integer(), nullable=False),
    sa.Column('incoming_content', sa.Text(), nullable=False),
    sa.Column('incoming_hash', sa.String(length=64), nullable=False),
    sa.Column('incoming_source', sa.String(length=500), nullable=True),
    sa.Column('import_id', sa.Integer(), nullable=True),
    sa.Column('created_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('resolved_at', shlhost.storage.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('resolution', sa.String(length=32), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_conflicts_account_id_accounts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['import_id'], ['imports.id'], name=op.f('fk_conflicts_import_id_imports'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_conflicts'))
    )
    with op.batch_alter_table('conflicts', schema=None) as batch_op:
        batch_op.create_index('ix_conflicts_open', ['account_id', 'resolved_at'], unique=False)

    op.create_table('resources',
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('resource_type', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=64), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('current', sa.Boolean(), nullable=False),
    sa.Column('last_updated', shlhost.storage.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=500), nullable=True),
    sa.Column('import_id', sa.Integer(), nullable=True),
    sa.Column('patient_id', sa.String(length=64), nullable=True),
    sa.Column('clinical_date', sa.String(length=35), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_resources_account_id_accounts'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['import_id'], ['imports.id'], name=op.f('fk_resources_import_id_imports'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('account_id', 'resource_type', 'resource_id', 'version_id', name=op.f('pk_resources'))
    )
    with op.batch_alter_table('resources', schema=None) as batch_op:
        batch_op.create_index('ix_resources_content', ['account_id', 'content_hash'], unique=False)
        batch_op.create_index('ix_resources_current_type', ['account_id', 'resource_type', 'current', 'resource_id'], unique=False)
        batch_op.create_index('ix_resources_patient', ['account_id', 'patient_id'], unique=False)
        batch_op.create_index('ix_resources_updated', ['account_id', 'last_updated'], unique=False)

    with op.batch_alter_table('links', schema=None) as batch_op:
        batch_op.create_foreign_key(batch_op.f('fk_links_account_id_accounts'), 'accounts', ['account_id'], ['id'], ondelete='SET NULL')
        batch_op.add_column(sa.Column('record_query', sa.Text(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('links', schema=None) as batch_op:
        batch_op.drop_column('record_query')
        batch_op.drop_constraint(batch_op.f('fk_links_account_id_accounts'), type_='foreignkey')

    with op.batch_alter_table('resources', schema=None) as batch_op:
        batch_op.drop_index('ix_resources_updated')
        batch_op.drop_index('ix_resources_patient')
        batch_op.drop_index('ix_resources_current_type')
        batch_op.drop_index('ix_resources_content')

    op.drop_table('resources')
    with op.batch_alter_table('conflicts', schema=None) as batch_op:
        batch_op.drop_index('ix_conflicts_open')

    op.drop_table('conflicts')
    with op.batch_alter_table('resource_identifiers', schema=None) as batch_op:
        batch_op.drop_index('ix_resource_identifiers_lookup')

    op.drop_table('resource_identifiers')
    with op.batch_alter_table('imports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_imports_account_id'))

    op.drop_table('imports')
    with op.batch_alter_table('api_tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_tokens_account_id'))

    op.drop_table('api_tokens')
    op.drop_table('accounts')
