"""Fetch a model from the Hugging Face hub at its pinned revision."""

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.models.hub import fetch_model

    fetch_model(snakemake.wildcards.model, snakemake.params.spec, snakemake.output[0])
