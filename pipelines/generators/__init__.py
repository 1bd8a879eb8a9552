"""Generators that fill a curated row's missing modality, and their Ray Data stage.

Text-to-image (`sd3`, `flux`: diffusers), text-to-audio (`audioldm2`: diffusers), captioning
(`image-to-text`: transformers), and the types installed packages add (`pipelines.plugins`; the
toy domain's renderer, `shapesworld`, stands in for all three). Every output records its
provenance (generator, checkpoint, seed, parameters); the same seed gives the same bytes.

- `base`: the interface, per-row seeds, provenance;
- `factory`: settings by `type` and `build_generator`;
- `config`: the job-side configs, with each stage's resources;
- `stage`: the Ray Data stage (`GenerateStage`, `fill_batch`, `start_rows`).

This package's own import loads nothing, so that a plugin importing `base` never runs the
factory's plugin discovery half-way through its own import.

    >>> from pipelines.generators.factory import build_generator
    >>> captioner = build_generator("caption", {"type": "image-to-text", "path": "Salesforce/blip-image-captioning-large"})
    >>> captioner.generate([png_bytes], seeds=[0])
    ['a red circle on a white background']
"""
