"""Embed a subject's reference images once (CLIP and DINOv2); every variant's evaluation reuses them."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.metrics.evaluate import embed_references

    embed_references(snakemake.input.images, snakemake.input.clip, snakemake.input.dino, snakemake.output[0],
                     clip_options=snakemake.params.clip)
