"""Scoring models for curation, no Ray: open_clip CLIP image-text similarity (`clip`), LAION
aesthetic heads on CLIP image embeddings (`aesthetic`) and CLAP audio-text similarity (`clap`)."""
