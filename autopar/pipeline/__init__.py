"""Inter-op half of autopar: pipeline stages over sub-meshes, each stage planned by the intra-op
ILP, and the runtime that executes the stages (``plan_training`` → ``TrainingPlan.apply``).

Data flow, one way (``autopar.pipeline.training.plan_training`` runs these steps in order)::

    inputs   (check options, trace the micro-batch loss)      → TrainingInputs
    layers   (stage markers or the layer-clustering DP)        → Layering
    stage_cost (a layer range × sub-mesh → intra-op plan)      → StageCost
    search   (exact or additive costs → solvers.stage_dp)      → StageSolution
    refine   (additive estimates → the chosen splits, exactly) → chosen stages
    assemble (stages, devices, timeline)                       → TrainingPlan
    runtime  (TrainingPlan.apply: one jitted task per stage)   → PipelineStep
"""
