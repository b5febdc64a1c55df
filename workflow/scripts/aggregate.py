"""Gather every variant's metrics, training summary and latency into results/tables/summary.{csv,md}."""

from conceptbench.aggregate import aggregate
from conceptbench.jobs import job

with job(snakemake.log[0]):
    aggregate(
        snakemake.params.experiments,
        metrics_files=snakemake.input.metrics,
        train_files=snakemake.input.train,
        sample_dirs=snakemake.input.samples,
        csv_path=snakemake.output.csv,
        md_path=snakemake.output.md,
    )
