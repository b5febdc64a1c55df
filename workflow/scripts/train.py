"""Train one variant on the shared core; resumes from its last checkpoint when rerun."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.registry import build
    from conceptbench.train import run_training

    run_training(
        build(snakemake.params.spec),
        snakemake.params.spec,
        base_model=snakemake.input.base,
        data_dir=snakemake.input.get("data"),
        class_dir=snakemake.input.get("class_images"),
        artifact_dir=snakemake.output.artifact,
        work_dir=snakemake.params.checkpoints,
        log_path=snakemake.output.loss,
        summary_path=snakemake.output.summary,
        threads=snakemake.threads,
        inputs=dict(snakemake.input.items()),
        model_options=snakemake.params.models,
    )
