"""Plot one experiment's metrics against its swept hyperparameter, with bootstrap intervals, the study's points,
the untrained baselines and, for DDPO, the training reward per epoch."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job
from conceptbench.plots import plot_sweep

with job(snakemake.log[0]):
    plot_sweep(
        snakemake.wildcards.experiment,
        snakemake.params.experiment,
        snakemake.input.summary,
        snakemake.output[0],
        study_path=snakemake.input.study,
        artifacts=snakemake.input.artifacts,
    )
