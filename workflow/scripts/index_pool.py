"""Embed a retrieval pool with the project's CLIP and index it with faiss, once per dataset."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    from conceptbench.metrics.encoders import ClipEncoder
    from conceptbench.retrieval import index_pool
    from conceptbench.runtime import set_threads

    set_threads(snakemake.threads)
    n = index_pool(snakemake.input.pool, ClipEncoder.load(snakemake.input.clip, **snakemake.params.clip), snakemake.output[0])
    log.info("indexed %d pool images", n)
