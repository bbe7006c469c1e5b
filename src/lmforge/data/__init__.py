"""Data for training and inference: corpus preparation (prepare.py: text -> cleaned, deduplicated token shards;
shards.py reads them back), batching and padding (collate.py)."""
