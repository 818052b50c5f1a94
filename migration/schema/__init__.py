"""Versioned SQL schema files, applied in name order by ``migration.store.Store.upgrade``.

Plain SQL rather than alembic: there is no ORM, the schema is a handful of tables, and the
partial indexes that keep candidate selection fast need SQL we write and control ourselves.
A file, once released, never changes; a change is a new file ``NNNN_name.sql``.
"""
