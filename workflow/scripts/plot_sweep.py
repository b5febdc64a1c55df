"""Plot one experiment's metrics against its swept hyperparameter, with bootstrap intervals and the study's points."""

from conceptbench.jobs import job
from conceptbench.plots import plot_sweep

with job(snakemake.log[0]):
    plot_sweep(
        snakemake.wildcards.experiment,
        snakemake.params.experiment,
        snakemake.input.summary,
        snakemake.output[0],
        study_path=snakemake.input.study,
    )
