"""Rows and how to change them: SQLAlchemy models, sessions, migrations, and job-state changes."""
