"""Data for training and inference: corpus preparation (prepare.py: text -> cleaned, deduplicated token shards;
shards.py reads them back), fine-tuning datasets (sft.py: instruction, dialog, domain, classification and seq2seq
rows -> token rows with loss masks, batched by length), batching and padding (collate.py)."""
