"""`groupdir tune`: Ray Tune sweeps over any config key, every trial an MLflow run under one parent.

A search space is a YAML file (tune/*.yaml): `fixed` config keys for every trial, and a `space` of
keys to search, each one of choice / grid / uniform / loguniform / int. A choice (or grid) may also
be a mapping of named bundles of keys that only make sense together, e.g.
`contrast: {choice: {paper: {similarity: cosine, temperature: 2.5}, authors: {...}}}`: the searcher
draws a name, the trial gets the bundle's keys, and MLflow records the name as the param `contrast`. Each trial is `run_trial`,
a Tune function that builds a TorchTrainer for its config (Ray Train V2's pattern) with Tune's
report callback, so every epoch's validation metrics reach the ASHA scheduler (which stops trials
that fall behind) and the Optuna searcher. A trial trains through `train_run`, the same code as
`groupdir train`, into its own MLflow child run; the driver marks trials stopped early or failed,
and at the end puts the best trial, a table of all trials and a plot of each parameter against the
metric on the sweep's parent run.

A sweep folder (runs/sweeps/NAME) holds:
  sweep.json        the parent run id, the space and the config, which --resume checks
  tune/             Ray Tune's experiment state (what Tuner.restore reads)
  ray/              Ray Train's checkpoints, one folder per trial
  trials/TRIAL_ID/  each trial's checkpoint.pt (best on validation), history.json, results.json
  trials.csv, summary.json   the outcome, written when every trial has ended
"""

from groupdir.sweep.run import ASHABeforeLastEpoch, run_sweep
from groupdir.sweep.space import Param, SweepSpec, load_space, sweep_config
from groupdir.sweep.summary import format_trials

__all__ = ["ASHABeforeLastEpoch", "Param", "SweepSpec", "format_trials", "load_space", "run_sweep", "sweep_config"]
