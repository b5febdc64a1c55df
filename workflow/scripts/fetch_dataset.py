"""Fetch a dataset from the Hugging Face hub at its pinned revision."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.data_hub import fetch_dataset

    fetch_dataset(snakemake.wildcards.dataset, snakemake.params.spec, snakemake.output[0])
