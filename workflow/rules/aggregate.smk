# Real-image upper bounds, the summary tables (paired deltas to each experiment's untrained base), plots,
# galleries, the "Does it learn?" page and their report items. These jobs import no torch: they start in
# a second. Report categories are methods; labels variants.


rule score_references:
    input:
        f"{RESULTS}/references/{{dataset}}.safetensors",
    output:
        f"{RESULTS}/references/{{dataset}}.scores.csv",
    log:
        f"{RESULTS}/logs/score_references/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/score_references/{{dataset}}.tsv"
    resources:
        mem_mb=1000,
        runtime=5,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/score_references.py"


rule aggregate:
    input:
        metrics=variant_files(f"{RESULTS}/metrics/{{experiment}}/{{variant}}.csv"),
        train=variant_files(f"{RESULTS}/train/{{experiment}}/{{variant}}/train.json"),
        samples=variant_files(f"{RESULTS}/samples/{{experiment}}/{{variant}}"),
        base_metrics=baseline_files(f"{RESULTS}/metrics/{{experiment}}/{{variant}}.csv"),
        base_samples=baseline_files(f"{RESULTS}/samples/{{experiment}}/{{variant}}"),
        references=reference_score_files,
        study=STUDY_RESULTS,
    output:
        csv=report(
            f"{RESULTS}/tables/summary.csv",
            caption="../report/summary.rst",
            category="Summary",
            labels={"item": "summary (CSV)"},
        ),
        html=report(
            f"{RESULTS}/tables/summary.html",
            caption="../report/summary.rst",
            category="Summary",
            labels={"item": "summary, study vs measured"},
        ),
        md=f"{RESULTS}/tables/summary.md",
        comparison=f"{RESULTS}/tables/study_comparison.csv",
        deltas=f"{RESULTS}/tables/deltas.csv",
        learning=report(
            f"{RESULTS}/tables/learning.html",
            caption="../report/learning.rst",
            category="Does it learn?",
            labels={"experiment": "all", "figure": "base vs best variant, paired deltas"},
        ),
    params:
        experiments=experiment_table,
        subjects=reference_subjects,
        notes=metric_notes,
    log:
        f"{RESULTS}/logs/aggregate/aggregate.log",
    benchmark:
        f"{RESULTS}/benchmarks/aggregate/aggregate.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/aggregate.py"


rule plot_sweep:
    input:
        summary=f"{RESULTS}/tables/summary.csv",
        study=STUDY_RESULTS,
        artifacts=experiment_artifacts,
    output:
        report(
            f"{RESULTS}/plots/{{experiment}}.png",
            caption="../report/sweep.rst",
            category=method_of,
            subcategory="Sweep",
            labels={"experiment": "{experiment}", "figure": "metrics vs swept value"},
        ),
    params:
        experiment=experiment_info,
        notes=metric_notes,
    log:
        f"{RESULTS}/logs/plot_sweep/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot_sweep/{{experiment}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plot_sweep.py"


rule plot_efficiency:
    input:
        summary=f"{RESULTS}/tables/summary.csv",
    output:
        size=report(
            f"{RESULTS}/plots/efficiency_size.png",
            caption="../report/efficiency.rst",
            category="Summary",
            labels={"item": "fidelity vs artifact size"},
        ),
        latency=report(
            f"{RESULTS}/plots/efficiency_latency.png",
            caption="../report/efficiency.rst",
            category="Summary",
            labels={"item": "fidelity vs latency"},
        ),
    params:
        notes=metric_notes,
    log:
        f"{RESULTS}/logs/plot_efficiency/plot_efficiency.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot_efficiency/plot_efficiency.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plot_efficiency.py"


rule plot_learning:
    input:
        summary=f"{RESULTS}/tables/summary.csv",
        samples=experiment_samples,
    output:
        report(
            f"{RESULTS}/plots/learning/{{experiment}}.png",
            caption="../report/learning_figure.rst",
            category="Does it learn?",
            labels={"experiment": "{experiment}", "figure": "base vs best variant, same seeds"},
        ),
    params:
        experiment=experiment_info,
    log:
        f"{RESULTS}/logs/plot_learning/{{experiment}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot_learning/{{experiment}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plot_learning.py"


rule plot_gallery:
    input:
        samples=f"{RESULTS}/samples/{{experiment}}/{{variant}}",
        metrics=f"{RESULTS}/metrics/{{experiment}}/{{variant}}.csv",
    output:
        report(
            f"{RESULTS}/plots/gallery/{{experiment}}/{{variant}}.png",
            caption="../report/gallery.rst",
            category=method_of,
            subcategory="Galleries",
            labels={"experiment": "{experiment}", "variant": "{variant}"},
        ),
    params:
        notes=metric_notes,
    log:
        f"{RESULTS}/logs/plot_gallery/{{experiment}}/{{variant}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/plot_gallery/{{experiment}}/{{variant}}.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/report.yaml"
    script:
        "../scripts/plot_gallery.py"


rule world_overview:
    input:
        unpack(world_overview_inputs),
    output:
        figure=report(
            f"{RESULTS}/world/overview.png",
            caption="../report/world.rst",
            category="Toy world",
            labels={"item": "base model, subjects, style"},
        ),
        quality=report(
            f"{RESULTS}/world/quality.html",
            caption="../report/world.rst",
            category="Toy world",
            labels={"item": "quality of the models"},
        ),
    log:
        f"{RESULTS}/logs/world_overview/world_overview.log",
    benchmark:
        f"{RESULTS}/benchmarks/world_overview/world_overview.tsv"
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../../envs/torch.yaml"
    script:
        "../scripts/world_overview.py"
