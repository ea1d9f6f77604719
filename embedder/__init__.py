"""Stage 1 of nightly-recs: ingest items and events, encode item texts (with a content-hash cache)."""
