"""Score every sample of a variant: CLIP-T, CLIP-I, DINO-I, aesthetic (and the prior probe's similarity to the
class images) per image, degenerate ones flagged."""

from conceptbench.warm import handoff

handoff()  # run in the warm worker when one listens (conceptbench/warm.py)

from conceptbench.jobs import job

with job(snakemake.log[0]):
    from conceptbench.metrics.evaluate import evaluate_samples

    evaluate_samples(
        snakemake.input.samples,
        snakemake.input.get("references"),
        snakemake.input.clip,
        snakemake.input.get("dino"),
        snakemake.input.get("aesthetic"),
        snakemake.output[0],
        class_refs_path=snakemake.input.get("class_references"),
        oracle_path=snakemake.input.get("oracle"),
        subject=snakemake.params.subject,
        clip_options=snakemake.params.clip,
    )
