"""Fidelity against artifact size and against latency, across methods."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job
from conceptbench.plots import plot_efficiency

with job(snakemake.log[0]):
    plot_efficiency(snakemake.input.summary, snakemake.output.size, x="artifact_bytes")
    plot_efficiency(snakemake.input.summary, snakemake.output.latency, x="latency_ms")
