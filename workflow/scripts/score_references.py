"""Score a subject's reference photos against each other (leave-one-out): the real-image upper bound."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.metrics.evaluate import score_references

    score_references(snakemake.input[0], snakemake.output[0])
