"""Durable state: database models, engine/session setup, migrations, the spool, queue and audit log.

Rules of this room (DESIGN.md): the only keeper of state; never speaks DICOM networking, never runs models.
"""
