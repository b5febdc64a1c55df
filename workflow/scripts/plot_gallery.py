"""One variant's samples as a grid, prompts by seeds, like the study's galleries."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job
from conceptbench.plots import plot_gallery

with job(snakemake.log[0]):
    w = snakemake.wildcards
    plot_gallery(f"{w.experiment} / {w.variant}", snakemake.input.samples, snakemake.input.metrics, snakemake.output[0])
