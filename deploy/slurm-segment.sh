#!/usr/bin/env bash
# Segment a folder of slides with a Slurm job array: task i of n runs `segment --shard i/n`, so the
# n tasks split the (sorted) inputs between them and write into one output folder without clashing
# (each shard keeps its own manifest, manifest.shard-i-of-n.jsonl). Resubmitting the same array
# resumes: --skip-existing leaves every input whose outputs are all there.
#
#   sbatch --array=0-15 deploy/slurm-segment.sh /shared/slides /shared/results /shared/model.safetensors [more segment options]
#
# With the container instead of an installed binary: MEDFASTSAM="apptainer exec medfastsam.sif medfastsam"
#SBATCH --job-name=medfastsam
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
#SBATCH --output=medfastsam-%A_%a.log
set -euo pipefail
slides=${1:?slides folder}
out=${2:?output folder}
weights=${3:?weights file}
shift 3
: "${SLURM_ARRAY_TASK_ID:?run this with sbatch --array=0-(N-1)}"
count=${SLURM_ARRAY_TASK_COUNT:-$(( ${SLURM_ARRAY_TASK_MAX:-0} + 1 ))}
${MEDFASTSAM:-medfastsam} segment "$slides" --weights "$weights" \
  --shard "${SLURM_ARRAY_TASK_ID}/${count}" --skip-existing --instances --geojson --out "$out" "$@"
