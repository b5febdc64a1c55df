"""Sample scoring: CLIP-T, CLIP-I, DINO-I and the LAION aesthetic score.

Kept import-light on purpose; import the submodule you need:
- `scores`: pure functions on embeddings and pixels (numpy only);
- `encoders`: ClipEncoder, DinoEncoder, AestheticScorer (torch, open_clip, transformers);
- `evaluate`: embed_references, score_references, evaluate_samples (the workflow's entry points);
- `aesthetic`: the LAION aesthetic MLP and its loader.
"""
