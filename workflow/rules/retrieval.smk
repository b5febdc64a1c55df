# Real class images by CLIP retrieval (Custom Diffusion's regularization): a retrieval pool is embedded
# and indexed with faiss once per dataset; each experiment's concepts take their top-k from it. The
# knn_service backend asks the clip-retrieval service instead and needs no pool.


rule index_pool:
    input:
        unpack(pool_index_inputs),
    output:
        directory(f"{RESULTS}/pools/{{dataset}}"),
    params:
        clip=clip_options,
    log:
        f"{RESULTS}/logs/index_pool/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/index_pool/{{dataset}}.tsv"
    threads: host_threads(8)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(32000),
        runtime=120,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/index_pool.py"


rule retrieve_class_images:
    input:
        unpack(retrieval_inputs),
    output:
        directory(f"{RESULTS}/retrieved/{{experiment}}/{{concept}}"),
    params:
        cfg=retrieval_params,
        clip=clip_options,
    wildcard_constraints:
        concept=r"\d+",
    log:
        f"{RESULTS}/logs/retrieve_class_images/{{experiment}}/{{concept}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/retrieve_class_images/{{experiment}}/{{concept}}.tsv"
    threads: host_threads(4)
    resources:
        gpu=1,
        gpu_model=gpu_model,
        mem_mb=host_mem_mb(16000),
        runtime=30,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/retrieve_class_images.py"
