"""The SQLite tables of a lipcert data dir as written by 397bafe (before models recorded their
input layout, network hash and importer version, and bounds their network): what
:class:`service.storage.Storage` upgrades when it opens such a store."""

OLD_TABLES = """
CREATE TABLE models (
    id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE, filename TEXT NOT NULL,
    format TEXT NOT NULL, kind TEXT NOT NULL, input_shape TEXT NOT NULL,
    output_shape TEXT NOT NULL, layers INTEGER NOT NULL, parameters INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE bounds (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, model_id TEXT NOT NULL, job_id TEXT,
    method TEXT NOT NULL, value REAL NOT NULL, verified INTEGER NOT NULL,
    created_at TEXT NOT NULL, result TEXT NOT NULL
);
"""
