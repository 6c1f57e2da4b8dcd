"""Persistence: the database (SQLAlchemy 2), its migrations, and the blob store."""
