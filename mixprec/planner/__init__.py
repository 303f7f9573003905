"""Budget planner: measure, choose every expert's format under a memory budget, evaluate, export.

    prof = profile_model(cfg, ids)                 # routing + per-source error of every unit
    prof = synthetic_profile("qwen3-235b-a22b")    # the same, from shapes and an error model
    res  = plan_budget(prof, budget)               # multiple-choice knapsack -> {unit: source}
    mix  = to_mix_config(prof, res.choice, paths)  # MixConfig (native YAML via to_yaml())
    evaluate(mix_cfg, ref_cfg, ids)                # KL(ref || mix), top-1 agreement, perplexity
    export_mix(mix_cfg, out_dir)                   # one checkpoint, every tensor in its source form

A *unit* is what the planner assigns one source to: an attention / dense-MLP / lm_head linear,
an expert's gate+up pair, or an expert's down_proj. Errors are relative output errors against
the base (bf16) source on the tokens routed to the unit, weighted by their routing weights.
"""
from .evaluate import evaluate, kl_metrics
from .export import export_mix
from .knapsack import PlanResult, fit_budget, parse_bytes, plan_budget, solve, to_mix_config
from .profile import load_profile, profile_model, spec_nbytes, synthetic_profile

__all__ = ["PlanResult", "evaluate", "export_mix", "fit_budget", "kl_metrics", "load_profile", "parse_bytes",
           "plan_budget", "profile_model", "solve", "spec_nbytes", "synthetic_profile", "to_mix_config"]
