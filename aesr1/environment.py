"""The environment variables the orchestration hands to the stages, each name written once.

The Prefect flows and tasks, DVC and the stage commands talk through them; each comment
says who sets the variable and who reads it.
"""

# set by the Prefect tasks to their flow run's id, or by hand; read by aesr1.tracking to nest stage runs under one
PIPELINE_ID = "AESR1_PIPELINE_ID"
# set by tasks/dvc_stage.py to a stage another work pool ran; read by aesr1.cli, which then refuses to run it here
RESTORE_ONLY = "AESR1_RESTORE_ONLY"
# set by flows/ablations.py for its queued `dvc exp` runs; read by aesr1.tracking as their MLflow experiment
EXPERIMENT = "AESR1_EXPERIMENT"
# set in a Prefect worker's environment; read by prefect.yaml as the checkout its flow runs work in
REPO = "AESR1_REPO"
# set by DVC for a `dvc exp run`; read by aesr1.tracking and aesr1.summary as the run's experiment name
DVC_EXPERIMENT = "DVC_EXP_NAME"
# set by DVC for a stage's command; read by aesr1.tracking: a pipeline runner launched the stage
DVC_ROOT = "DVC_ROOT"

# what a stage handed to another machine takes along from the pipeline's environment (tasks/dvc_stage.py): the MLflow
# experiment and DVC experiment its runs belong to
FORWARDED = (EXPERIMENT, DVC_EXPERIMENT)
