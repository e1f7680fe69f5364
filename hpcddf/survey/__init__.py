"""``hpcddf survey``: many fields reduced and mosaicked as one survey, with a database as its ledger.

A survey is a pointings table, a site, ddf-pipeline cfg files and a work root. Its database
(SQLite on a local disk, or MySQL/MariaDB for shared operation, one code path through
SQLAlchemy) records each field's survey state, attempts, node-hours and last error, and every
state change (for the rate and the ETA). The field state files under the work root stay the
truth for a field's stages; the tick reconciles the database from them.

Modules: ``storage`` (where the database is, refusing SQLite on network file systems),
``db`` (schema, version check, state transitions, bulk reads), ``setup`` (``survey init``),
``status`` (``survey status`` numbers and the sky plot).
"""
