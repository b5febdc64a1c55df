"""Gather every variant's and baseline's metrics (with bootstrap intervals and paired deltas to the base),
training summary and latency, the real-image upper bounds and the study's numbers into
results/tables/summary.{csv,md,html}, deltas.csv and learning.html."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

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
        subjects=snakemake.params.subjects,
        reference_files=snakemake.input.references,
        study_path=snakemake.input.study,
        html_path=snakemake.output.html,
        comparison_path=snakemake.output.comparison,
        baseline_metrics_files=snakemake.input.base_metrics,
        baseline_sample_dirs=snakemake.input.base_samples,
        deltas_path=snakemake.output.deltas,
        learning_path=snakemake.output.learning,
    )
