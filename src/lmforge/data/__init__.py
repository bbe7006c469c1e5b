"""Data for training and inference: batching and padding (corpus preparation and datasets come with training)."""
