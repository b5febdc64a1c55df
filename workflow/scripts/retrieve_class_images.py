"""Retrieve one concept's real class images (the top k for its class prompt), shared by every variant."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    from conceptbench.retrieval import run_retrieval
    from conceptbench.runtime import set_threads

    set_threads(snakemake.threads)
    rows = run_retrieval(snakemake.params.cfg, snakemake.output[0], clip_dir=snakemake.input.get("clip"),
                         index_dir=snakemake.input.get("index"), pool_dir=snakemake.input.get("pool"),
                         clip_options=snakemake.params.clip)
    log.info("retrieved %d images for %r", len(rows), snakemake.params.cfg["prompt"])
