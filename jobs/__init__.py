"""Job entrypoints: `python -m jobs.NAME --config FILE.yaml [key=value ...]`."""
