"""Sample a variant (or, without an artifact, a baseline): every prompt x seed with fixed generators, plus latency."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.sample import run_sampling

    run_sampling(
        snakemake.params.spec,
        base_model=snakemake.input.base,
        artifact_dir=snakemake.input.get("artifact"),
        cfg=snakemake.params.cfg,
        out_dir=snakemake.output.samples,
        threads=snakemake.threads,
    )
