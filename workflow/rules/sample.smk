# Sampling: every prompt x seed with fixed generators (a rerun gives the same images), batched,
# plus the steady-state latency of one image. A baseline (`base`, ...) samples the base model untouched.


rule sample:
    input:
        unpack(sample_inputs),
    output:
        samples=report(
            directory(f"{RESULTS}/samples/{{experiment}}/{{variant}}"),
            patterns=["{name}.png"],
            caption="../report/samples.rst",
            category=method_of,
            subcategory="Samples",
            labels={"variant": "{variant}", "image": "{name}"},
        ),
    params:
        spec=variant_spec,
        cfg=sampling_params,
    log:
        f"{RESULTS}/logs/sample/{{experiment}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/sample/{{experiment}}/{{variant}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(32000),
        runtime=60,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/sample.py"
