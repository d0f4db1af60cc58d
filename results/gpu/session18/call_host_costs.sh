# call 1 (session 18, commit after ac62e34): host costs of the compiled step's critical path, random weights of SmolLM2's shape
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1; python3 scripts/host_costs.py --out $OUT/hc 2>&1 | grep -v Warning | tail -60
# call D (training step profile, random weights):
# export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1; python3 scripts/train_step_profile.py --out $OUT/u2
