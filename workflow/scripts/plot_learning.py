"""Draw one experiment's untrained base and best variant side by side on the same seeds ("Does it learn?")."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job
from conceptbench.plots import plot_learning

with job(snakemake.log[0]):
    plot_learning(
        snakemake.wildcards.experiment,
        snakemake.params.experiment,
        snakemake.input.summary,
        snakemake.input.samples,
        snakemake.output[0],
    )
