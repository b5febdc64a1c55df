"""Check every image of a dataset and write it as RGB PNGs with metadata.jsonl."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.data import prepare_dataset
from conceptbench.jobs import job

with job(snakemake.log[0]) as log:
    raw = snakemake.input.get("raw")
    rows = prepare_dataset(snakemake.wildcards.dataset, snakemake.params.spec, raw, snakemake.output[0])
    log.info("prepared %d images from %s", len(rows), raw or "scikit-image")
