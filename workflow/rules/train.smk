# Training: one rule for every method and variant, on the shared core (src/conceptbench/train).
# Checkpoints live outside the outputs, so a failed or preempted job resumes instead of restarting.


rule train:
    input:
        unpack(train_inputs),
    output:
        artifact=directory(f"{RESULTS}/train/{{experiment}}/{{variant}}/artifact"),
        summary=f"{RESULTS}/train/{{experiment}}/{{variant}}/train.json",
        loss=f"{RESULTS}/train/{{experiment}}/{{variant}}/loss.jsonl",
    params:
        spec=variant_spec,
        models=train_model_options,
        checkpoints=f"{RESULTS}/checkpoints/{{experiment}}/{{variant}}",
    log:
        f"{RESULTS}/logs/train/{{experiment}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{experiment}}/{{variant}}.tsv"
    threads: host_threads(8)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(64000),
        runtime=train_runtime,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/train.py"
