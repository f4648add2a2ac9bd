"""Pydantic models for every record and file the pipeline reads or writes.

`python -m schemas.generate` writes schemas/json/*.schema.json; a test fails when they drift.
"""
