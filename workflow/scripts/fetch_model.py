"""Fetch a model from the Hugging Face hub at its pinned revision."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.models.hub import fetch_model

    fetch_model(snakemake.wildcards.model, snakemake.params.spec, snakemake.output[0])
