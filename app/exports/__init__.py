"""A project's votes in and out: Pick-a-Pic parquet, FastChat battles, JSONL and CSV."""
