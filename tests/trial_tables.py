"""A hand-made table of finished trials on which every claim judged from the trials' own statistics holds: the
verdict tests change a column at a time and read which verdicts move."""

from __future__ import annotations

# column -> (first trial's value, change from one trial to the next)
GOOD_COLUMNS = dict(
    transition_found=(1.0, 0.0),
    transition_p_value=(0.01, 0.01),
    transition_monotone_fit=(0.3, 0.05),
    emergence_near_share=(0.8, -0.05),
    initial_share=(0.30, 0.02),
    unresolved_share=(0.1, 0.05),
    control_initial_share=(1.0, 0.0),
    median_emergence_step=(4.0, 0.0),
    order_coherence=(0.9, 0.02),
    norm_proxy_r=(-0.9, 0.02),
    norm_proxy_r_within=(-0.7, -0.03),
    norm_proxy_r_within_low=(-0.85, -0.03),
    norm_proxy_r_within_high=(-0.6, -0.02),
    explained_variance=(0.92, 0.0),
    min_explained_variance_by_snapshot=(0.9, -0.01),
    control_explained_variance=(-0.4, 0.05),
    min_loss_recovered_by_snapshot=(0.9, -0.02),
    l0=(6.0, 1.0),
    l0_per_dimension=(0.05, 0.01),
    delta_ce_max=(0.1, 0.05),
    dead_fraction=(0.0, 0.03),
    token_specificity_r=(0.3, 0.05),
    token_specificity_r_low=(0.2, 0.03),
    token_specificity_r_high=(0.4, 0.05),
    causal_ablate_relative=(0.2, 0.05),
    causal_ablate_relative_low=(0.1, 0.05),
    causal_ablate_relative_high=(0.3, 0.05),
    causal_keep_relative=(0.97, 0.0),
    causal_keep_relative_low=(0.94, 0.0),
    causal_keep_relative_high=(1.0, 0.01),
    causal_random_ablate_relative=(0.95, -0.02),
    causal_random_keep_relative=(0.1, 0.05),
    causal_ablate_k=(6.0, 0.0),
    causal_keep_k=(13.0, 0.0),
    attribution_gap_max=(0.01, 0.01),
    error_effect_share_max=(0.1, 0.05),
    task_learned_snapshots=(3.0, 0.0),
    task_learned_step=(4.0, 0.0),
    relie_onset_step=(4.0, 0.0),
    relie_top_mean=(0.9, -0.05),
)


def good_trials(count: int, **changes: list[float]) -> dict[str, list[float]]:
    """``count`` trials' columns, every claim's statistic passing its rule, with ``changes`` (full columns)."""
    table = {name: [first + index * step for index in range(count)] for name, (first, step) in GOOD_COLUMNS.items()}
    return table | changes
